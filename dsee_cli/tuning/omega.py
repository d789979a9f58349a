"""Ω-finders: where the sparse residual S of ΔW may be non-zero (Algorithm 1, §A.2).

``grebsmo`` decomposes the pretrained W ≈ UV + S′ (greedy bilateral smoothing, batched over
matrices of one shape) and keeps the N largest |S′|; ``magnitude`` keeps the N largest |W|;
``random`` draws N seeded positions. Ω depends only on pretrained weights, so it is cached
on disk keyed by the weights' content and the finder settings. ``fisher`` (RoSA) ranks entries
by their gradients after a LoRA warm-up instead: tuning/fisher.py and run/fisher_step.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dsee_cli
from dsee_cli.atomic import atomic_path
from dsee_cli.core.selection import largest_k_indices
from dsee_cli.errors import DSEEError, choice_error

log = logging.getLogger("dsee")


@dataclass(frozen=True)
class GreBsmoSettings:
    rank: int = 16  # the largest rank of UV
    rank_start: int = 4  # start small: rank above what W has fits its largest spikes into UV
    rank_step: int = 6
    outer_iters: int = 3
    inner_iters: int = 2
    threshold: float = 0.01
    soft: bool = False  # hard threshold x·1{|x| ≥ λ} as the paper and reference; soft: sign(x)·max(|x|-λ, 0)
    # GoDec's card(S) constraint: S keeps only this many largest |X - UV| per matrix (the
    # threshold is then ignored). None: threshold as the paper. A fixed small absolute
    # threshold lets S swallow the whole residual, so X - S ≈ UV and U stops moving.
    sparse_card: int | None = 64
    reset_sparse: bool = False  # the reference code sets S = 0 at each outer step
    power_iters: int = 1  # GoDec's power scheme: Y <- (X-S)(X-S)ᵀY before each QR, for a sharper subspace
    tol: float = 0.0  # stop when ||X - UV - S|| / ||X|| < tol (0: run every iteration)
    seed: int = 0


PRESETS = {
    # The reference code: rank from 1 growing by 5, 100 outer x 2 inner, hard 0.01, S reset.
    "reference": GreBsmoSettings(
        rank=10_000, rank_start=1, rank_step=5, outer_iters=100, inner_iters=2,
        threshold=0.01, soft=False, sparse_card=None, reset_sparse=True, tol=0.0, power_iters=0,
    ),
    # Ours: rank 4 -> 10 -> 16 with one power step and card(S) = 64 isolates planted spikes
    # (also where top-|W| is fooled) in < 1 s for BERT-base's 24 q,v matrices on 2 cores.
    "fast": GreBsmoSettings(),
}


class _DenseS:
    """S = threshold(X - UV), as the paper's S_λ and the reference code."""

    def __init__(self, s: torch.Tensor | None):
        self.s = s  # None: S = 0, so X - S is X itself (no subtraction)
        self._low: torch.Tensor | None = None

    @classmethod
    def zero(cls, x: torch.Tensor, settings: GreBsmoSettings) -> _DenseS:
        return cls(None)

    @classmethod
    def from_residual(cls, r: torch.Tensor, settings: GreBsmoSettings) -> _DenseS:
        """Soft sign(r)·max(|r|-λ, 0) or hard r·1{|r| > λ}, each one fused kernel."""
        if settings.soft:
            return cls(torch.nn.functional.softshrink(r, settings.threshold))
        return cls(torch.nn.functional.hardshrink(r, settings.threshold))

    def x_minus_s(self, x: torch.Tensor) -> torch.Tensor:
        if self.s is None:
            return x
        if self._low is None:  # used twice per step: compute once
            self._low = x - self.s
        return self._low

    def x_minus_s_times_vt(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.x_minus_s(x) @ v.transpose(1, 2)

    def ut_times_x_minus_s(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u.transpose(1, 2) @ self.x_minus_s(x)

    def dense(self) -> torch.Tensor:
        return self.s


class _SparseS:
    """S = the card largest entries of X - UV (GoDec's card constraint), kept as indices and
    values, so (X - S)·Vᵀ and Uᵀ·(X - S) are computed without a dense X - S."""

    def __init__(self, shape: tuple[int, ...], idx: torch.Tensor, vals: torch.Tensor):
        self.shape, self.idx, self.vals = shape, idx, vals
        self.rows, self.cols = idx // shape[2], idx % shape[2]

    @classmethod
    def zero(cls, x: torch.Tensor, settings: GreBsmoSettings) -> _SparseS:
        b = x.shape[0]
        return cls(tuple(x.shape), x.new_zeros(b, 0, dtype=torch.long), x.new_zeros(b, 0))

    @classmethod
    def from_residual(cls, r: torch.Tensor, settings: GreBsmoSettings) -> _SparseS:
        flat = r.flatten(1)
        idx = flat.abs().topk(min(settings.sparse_card, flat.shape[1]), dim=1).indices
        return cls(tuple(r.shape), idx, flat.gather(1, idx))

    def x_minus_s_times_vt(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, r = x @ v.transpose(1, 2), v.shape[1]  # (b, m, r)
        picked = v.gather(2, self.cols[:, None, :].expand(-1, r, -1)).transpose(1, 2)  # (b, c, r)
        return out.scatter_add_(1, self.rows[..., None].expand(-1, -1, r), -self.vals[..., None] * picked)

    def ut_times_x_minus_s(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        out, r = u.transpose(1, 2) @ x, u.shape[2]  # (b, r, n)
        picked = u.gather(1, self.rows[..., None].expand(-1, -1, r)).transpose(1, 2)  # (b, r, c)
        return out.scatter_add_(2, self.cols[:, None, :].expand(-1, r, -1), -self.vals[:, None, :] * picked)

    def dense(self) -> torch.Tensor:
        b, m, n = self.shape
        return self.vals.new_zeros(b, m * n).scatter_(1, self.idx, self.vals).view(b, m, n)


@torch.no_grad()
def grebsmo(x: torch.Tensor, settings: GreBsmoSettings) -> torch.Tensor:
    """Sparse part S′ of a batch of matrices x (b, m, n) ≈ U V + S′.

    U = Q of QR((X - S) Vᵀ); V = Uᵀ (X - S); S = threshold(X - U V) (or its card largest
    entries), with the rank of U V grown greedily by ``rank_step`` each outer iteration
    (new rows of V drawn at random).
    """
    if x.dim() == 2:
        return grebsmo(x[None], settings)[0]
    x = x.float()
    b, m, n = x.shape
    kind = _SparseS if settings.sparse_card is not None else _DenseS
    max_rank = min(settings.rank, m, n)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    rank = min(settings.rank_start, max_rank)
    # One random sketch shared by the batch: a matrix's Ω never depends on its batch-mates.
    v = torch.randn(1, rank, n, generator=gen).to(x.device).expand(b, -1, -1)
    s = kind.zero(x, settings)
    norm_x = torch.linalg.matrix_norm(x).clamp_min(1e-12)
    for outer in range(settings.outer_iters):
        if settings.reset_sparse:
            s = kind.zero(x, settings)
        last_outer = outer + 1 == settings.outer_iters
        for inner in range(settings.inner_iters):
            u = orthonormal_basis(s.x_minus_s_times_vt(x, v))
            for _ in range(settings.power_iters):
                u = orthonormal_basis(s.x_minus_s_times_vt(x, s.ut_times_x_minus_s(x, u)))
            v = s.ut_times_x_minus_s(x, u)
            # With S reset at the next outer step, this step's last S is never read: skip it.
            discarded = settings.reset_sparse and inner + 1 == settings.inner_iters and not last_outer
            if not discarded or settings.tol > 0:
                s = kind.from_residual(torch.baddbmm(x, u, v, alpha=-1), settings)
        if settings.tol > 0:
            err = torch.linalg.matrix_norm(torch.baddbmm(x, u, v, alpha=-1) - _dense(s, x)) / norm_x
            if bool((err < settings.tol).all()):
                break
        if outer + 1 < settings.outer_iters and rank < max_rank:
            grow = min(settings.rank_step, max_rank - rank)
            v = torch.cat([v, torch.randn(1, grow, n, generator=gen).to(x.device).expand(b, -1, -1)], 1)
            rank += grow
    return _dense(s, x)


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of each matrix's column span (b, m, r); only the span matters here.

    Wide sketches use Cholesky-QR (Gram in float64, then a triangular solve: matmul speed,
    about twice Householder QR's at rank ~500); Householder QR where the Gram matrix is not
    positive definite or the sketch is narrow.
    """
    if y.shape[-1] < 64:
        return torch.linalg.qr(y)[0]
    gram = (y.transpose(1, 2) @ y).double()
    r, info = torch.linalg.cholesky_ex(gram, upper=True)
    if bool(info.any()):
        return torch.linalg.qr(y)[0]
    return torch.linalg.solve_triangular(r.to(y.dtype), y, upper=True, left=False)


def _dense(s, x: torch.Tensor) -> torch.Tensor:
    dense = s.dense()
    return torch.zeros_like(x) if dense is None else dense


def grebsmo_parallel(x: torch.Tensor, settings: GreBsmoSettings) -> torch.Tensor:
    """grebsmo on CPU with the batch split across cores, one intra-op thread each.

    LAPACK's QR barely uses a second core on its own; independent halves do. Results are
    identical to one batch, since the random sketch is shared by every matrix.
    """
    workers = min(torch.get_num_threads(), x.shape[0])
    if x.device.type != "cpu" or workers < 2:
        return grebsmo(x, settings)
    chunks = torch.tensor_split(x, workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda c: grebsmo(c, settings), chunks))
    finally:
        torch.set_num_threads(previous)
    return torch.cat(parts)


def top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the n largest scores of each matrix in a batch (b, m, k) -> (b, n).

    Exactly n per matrix; ties go to the lower flat index, so the result is deterministic.
    Returned sorted ascending.
    """
    flat = scores.flatten(1)
    if n > flat.shape[1]:
        raise DSEEError(f"card(Ω) = {n} is larger than the matrix it indexes ({flat.shape[1]} entries).")
    return largest_k_indices(flat, n)


# -- the finders: a batch of same-shape matrices -> a score per entry (Ω: the n largest) ------
Finder = Callable[[torch.Tensor, GreBsmoSettings], torch.Tensor]


def _grebsmo_scores(batch: torch.Tensor, settings: GreBsmoSettings) -> torch.Tensor:
    return grebsmo_parallel(batch, settings).abs()


def _magnitude_scores(batch: torch.Tensor, settings: GreBsmoSettings) -> torch.Tensor:
    return batch.abs()


def _random_scores(batch: torch.Tensor, settings: GreBsmoSettings) -> torch.Tensor:
    return torch.rand(batch.shape, generator=torch.Generator().manual_seed(settings.seed))


# omega.method -> its finder; a new finder is one function and one entry here
FINDERS: dict[str, Finder] = {"grebsmo": _grebsmo_scores, "magnitude": _magnitude_scores, "random": _random_scores}
# ... and Ω from gradients after a LoRA warm-up (tuning/fisher.py, run/fisher_step.py): it needs training data
METHODS = (*FINDERS, "fisher")


def final_rank(settings: GreBsmoSettings) -> int:
    """The rank UV reaches: rank_start grown by rank_step at each outer iteration but the last."""
    return min(settings.rank, settings.rank_start + settings.rank_step * max(0, settings.outer_iters - 1))


def _full_rank_error(name: str, shape: tuple[int, ...], settings: GreBsmoSettings, preset: str) -> DSEEError:
    """Ω would be positions 0..N-1 (S' = 0): say why, and how to get a real Ω."""
    rank = final_rank(settings)
    why = (f"the rank of UV grows to {rank} >= min(m, n) = {min(shape)}, so UV reproduces the matrix"
           if rank >= min(shape) else
           f"at rank {rank} every entry of X - UV is below the threshold {settings.threshold}")
    return DSEEError(
        f"Ω cannot be found for {name} (shape {tuple(shape)}) with GreBsmo preset {preset!r}: {why}, so S' is all "
        f"zeros and Ω would be positions 0..N-1, not a property of the weights. (The reference preset grows the "
        f"rank to 496, below BERT-base's 768.) Cap the rank (omega.rank={max(1, min(shape) // 2)}, for instance), "
        f"or use the fast preset (omega=grebsmo), magnitude or random.")


def find_omega(
    weights: dict[str, torch.Tensor], n: int | dict[str, int], method: str, settings: GreBsmoSettings,
    preset: str = "custom"
) -> dict[str, torch.Tensor]:
    """Ω (n flat indices, or ``n[name]`` for each: omega_counts) for each named out x in matrix.
    Matrices of one shape are batched.
    Never arbitrary: a GreBsmo whose rank reaches a matrix's full rank, or any finder whose
    scores are all zero on a matrix, is an error naming the matrix, its shape and the preset."""
    if method not in FINDERS:
        raise choice_error("Ω method (omega.method)", method, tuple(FINDERS))
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    if method == "grebsmo":  # before any work: the check needs only the shapes
        for shape, names in by_shape.items():
            if final_rank(settings) >= min(shape):
                raise _full_rank_error(names[0], shape, settings, preset)
    result = {}
    for shape, names in by_shape.items():
        batch = torch.stack([weights[k].detach().float() for k in names])
        scores = FINDERS[method](batch, settings)
        empty = [name for name, sc in zip(names, scores) if not bool(sc.any())]
        if empty:
            if method == "grebsmo":
                raise _full_rank_error(empty[0], shape, settings, preset)
            raise DSEEError(f"Ω cannot be found for {empty[0]} (shape {shape}) by {method}: every score is zero "
                            f"(an all-zero weight matrix?), so Ω would be positions 0..N-1.")
        for name, idx in zip(names, top_n(scores.cpu(), n if isinstance(n, int) else n[names[0]])):
            result[name] = idx.clone()
    return result


def omega_counts(shapes: dict[str, tuple[int, int]], omega_size: int, density: float) -> dict[str, int]:
    """card(Ω) of each named out x in matrix: ``adapter.omega_size`` for every one, or with
    ``adapter.density`` > 0 (which replaces omega_size) the fraction of its entries, floor(density · m · n)
    as RoSA rounds.
    A count of zero or one that does not fit the matrix is an error naming it and the valid range."""
    counts = {}
    for name, (m, k) in shapes.items():
        count = math.floor(density * m * k + 1e-9) if density else omega_size
        if density and count < 1:
            raise DSEEError(f"adapter.density={density:g} keeps floor({density:g} x {m} x {k}) = 0 positions of {name} "
                            f"({m} x {k}): no sparse part. Valid: density >= {1 / (m * k):.3g} for this matrix "
                            f"(1 position), and < 1.")
        if count > m * k:
            what = f"adapter.omega_size={omega_size}" if not density else f"adapter.density={density:g}"
            raise DSEEError(f"{what} asks for {count} positions of {name}, which has {m} x {k} = {m * k} entries. "
                            f"Valid: 1..{m * k} positions (density in (0, 1)).")
        counts[name] = count
    return counts


# -- the disk cache ---------------------------------------------------------------------------
def cache_key(weights: dict[str, torch.Tensor], n: int | dict[str, int], method: str, settings: GreBsmoSettings,
              extra: dict | None = None) -> str:
    """Content hash: the weights themselves identify the model, whatever it was called; and the
    code's results version, so that a fix to a finder is never answered from an older Ω."""
    h = hashlib.sha256()
    relevant = asdict(settings) if method == "grebsmo" else {"seed": settings.seed} if method == "random" else {}
    h.update(json.dumps({"n": n, "method": method, "settings": relevant, "results": dsee_cli.results_version(),
                         **({"extra": extra} if extra else {})}, sort_keys=True, default=str).encode())
    for name in sorted(weights):
        w = weights[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class OmegaResult:
    indices: dict[str, torch.Tensor]
    cache_path: Path | None
    from_cache: bool
    seconds: float


def cached_omega(
    weights: dict[str, torch.Tensor],
    n: int | dict[str, int],
    method: str,
    settings: GreBsmoSettings,
    cache_dir: Path | None,
    preset: str = "custom",
) -> OmegaResult:
    """Compute Ω once per (weights, method, settings); concurrent jobs wait on a file lock."""
    start = time.perf_counter()
    if cache_dir is None:
        return OmegaResult(find_omega(weights, n, method, settings, preset), None, False, time.perf_counter() - start)
    key = cache_key(weights, n, method, settings)
    path = Path(cache_dir) / f"omega-{method}-{key}.safetensors"
    with _file_lock(path.with_suffix(".lock")):
        if path.exists():
            loaded = load_file(path)
            return OmegaResult(loaded, path, True, time.perf_counter() - start)
        indices = find_omega(weights, n, method, settings, preset)
        with atomic_path(path) as tmp:
            meta = {"method": method, "n": str(n), "version": dsee_cli.results_version()}
            save_file(indices, str(tmp), metadata=meta)
    return OmegaResult(indices, path, False, time.perf_counter() - start)


@dataclass
class OmegaConfig:
    """The ``omega`` section: which finder picks Ω, and GreBsmo's preset with any value overridden."""

    method: str = "grebsmo"  # grebsmo, magnitude (largest |W|), random, or fisher (gradients after a LoRA warm-up)
    preset: str = "fast"  # grebsmo: fast (ours) or reference (the paper's code)
    # Any of these overrides the preset's value.
    rank: int | None = None
    rank_start: int | None = None  # grebsmo: the rank of UV at the start
    rank_step: int | None = None  # grebsmo: its growth per outer iteration
    outer_iters: int | None = None  # grebsmo: outer iterations
    inner_iters: int | None = None  # grebsmo: inner iterations per outer one
    threshold: float | None = None  # grebsmo: |S| below this is 0 (without sparse_card)
    soft: bool | None = None  # grebsmo: soft instead of hard thresholding
    sparse_card: int | None = None  # 0: threshold instead of a card constraint
    reset_sparse: bool | None = None  # grebsmo: S = 0 at each outer iteration (the reference code)
    tol: float | None = None  # grebsmo: stop at this relative error (0: never)
    # the random draws: random Ω's positions (null: the run's seed, so seeds draw different Ω) and
    # GreBsmo's sketch (null: 0, so Ω stays a property of the pretrained weights, shared by seeds)
    seed: int | None = None
    # fisher (RoSA): LoRA steps before the gradients are taken (RoSA's schedule wl64), with Ω empty
    warmup_steps: int = 64
    grad_batches: int = 1  # fisher: batches whose gradients of each adapted W are accumulated (RoSA's spa_num_grads)
    grad_stat: str = "fisher"  # fisher: Σ g² (a diagonal Fisher; RoSA's mean_squared) or mean: |Σ g|
    restart: bool = True  # fisher: phase I starts from the adapters' initial values (RoSA); false: from the warm-up's
    passes: int = 1  # fisher: the matrices split over this many passes: 1/passes of the accumulators' memory
    cache: bool = True  # keep Ω on disk, computed once per weights and settings
    cache_dir: str | None = None  # default: $DSEE_CACHE or ~/.cache/dsee-cli, then /omega

    def check(self) -> None:
        if self.method not in METHODS:
            raise choice_error("Ω method (omega.method)", self.method, METHODS)
        if self.method == "fisher":
            if self.grad_stat not in ("fisher", "mean"):
                raise choice_error("gradient statistic (omega.grad_stat)", self.grad_stat, ("fisher", "mean"))
            if self.warmup_steps < 0 or self.grad_batches < 1 or self.passes < 1:
                raise DSEEError(f"omega.warmup_steps={self.warmup_steps} must be >= 0, omega.grad_batches="
                                f"{self.grad_batches} and omega.passes={self.passes} >= 1.")
        if self.preset not in PRESETS:
            raise choice_error("GreBsmo preset (omega.preset)", self.preset, PRESETS)

    def finder_seed(self, run_seed: int) -> int:
        if self.seed is not None:
            return self.seed
        return run_seed if self.method == "random" else 0

    def grebsmo(self, run_seed: int = 0) -> GreBsmoSettings:
        """The preset's parameters with this section's overrides (sparse_card 0: no card constraint),
        and the finder's seed for a run of seed ``run_seed``."""
        self.check()
        names = ("rank", "rank_start", "rank_step", "outer_iters", "inner_iters", "threshold", "soft", "reset_sparse",
                 "tol")
        overrides = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        settings = replace(PRESETS[self.preset], seed=self.finder_seed(run_seed), **overrides)
        if self.sparse_card is not None:
            settings = replace(settings, sparse_card=self.sparse_card or None)
        return settings


def omega_file_version(path: Path) -> str:
    """The results version an Ω cache file was computed with ("older" before versions were recorded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("version", "older")
    except Exception:
        return "unreadable"
