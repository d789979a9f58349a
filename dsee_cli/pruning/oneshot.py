"""One-shot LLM pruners' numerics, one linear layer at a time: Wanda (Sun et al. 2023) and
SparseGPT (Frantar & Alistarh 2023), from the calibration inputs of that layer.

* ``InputStats`` accumulates what both need from a linear's calibration inputs X (tokens x in):
  the squared column norms ‖X_j‖² (Wanda) and the Hessian H = 2·XᵀX / tokens (SparseGPT).
* ``wanda_masks``: score |W_ij|·‖X_j‖₂, compared within each output row (Wanda's grouping):
  exactly round(sparsity·in) pruned per row, or N of every M inputs kept.
* ``sparsegpt``: the OBS reconstruction column by column with the upper Cholesky factor of the
  damped inverse Hessian (damping ``percdamp``·mean diag H), in lazy blocks of ``blocksize``
  columns; the unstructured mask is chosen per block by w²/[H⁻¹]²_jj, as the reference code does
  (exact sparsity per block of columns), N:M per group of M inputs. The kept weights are updated
  to compensate, so the layer's output on the calibration inputs changes as little as it can.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsee_cli.core.selection import n_of_m_keep, smallest_k_mask
from dsee_cli.errors import DSEEError


@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs (each call adds a batch of tokens)."""

    features: int
    hessian: bool = True  # SparseGPT needs H; Wanda only the column norms
    tokens: int = 0
    sq_norms: torch.Tensor | None = field(default=None, init=False)  # allocated by the first batch, where it is
    h: torch.Tensor | None = field(default=None, init=False)

    def add(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """A batch of inputs (..., features); ``tokens`` (bool, x's leading shape) picks the real
        tokens, so padding enters neither the norms nor H. Each batch's sums are taken in fp32 and
        accumulated where the inputs are (a GPU's float32, as the reference code; float64 on CPU)."""
        x = x.detach()
        if tokens is not None:
            if tuple(x.shape[:-1]) != tuple(tokens.shape):
                raise DSEEError(f"calibration: a layer's inputs {tuple(x.shape)} do not line up with the batch's "
                                f"tokens {tuple(tokens.shape)}, so padding cannot be left out of its statistics; "
                                f"calibrate on unpadded windows (pruning.calibration.source=<text>).")
            x = x[tokens]
        x = x.reshape(-1, self.features).float()  # one batch's sums in fp32 (a bf16 input upcast)
        if self.sq_norms is None:
            dtype = torch.float64 if x.device.type == "cpu" else torch.float32
            self.sq_norms = torch.zeros(self.features, dtype=dtype, device=x.device)
            if self.hessian:
                self.h = torch.zeros(self.features, self.features, dtype=dtype, device=x.device)
        self.tokens += x.shape[0]
        with torch.autocast(x.device.type, enabled=False):  # the forward's autocast would take XᵀX to bf16
            self.sq_norms += x.square().sum(0)
            if self.h is not None:
                self.h += x.t() @ x

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sq_norms, self.h) if t is not None)

    def column_norms(self) -> torch.Tensor:
        return torch.zeros(self.features) if self.sq_norms is None else self.sq_norms.sqrt().float()

    def hessian_matrix(self) -> torch.Tensor:
        if self.h is None or not self.tokens:
            raise DSEEError("SparseGPT needs the calibration Hessian of the layer; no calibration input reached it.")
        return 2.0 * self.h / self.tokens  # as accumulated (float64 on CPU): sparsegpt() inverts it in float64


def _check_nm(n: int, m: int, columns: int) -> None:
    if not 0 < n < m:
        raise DSEEError(f"N:M pruning needs 0 < n < m, got n={n}, m={m}.")
    if columns % m:
        raise DSEEError(f"N:M pruning needs in_features divisible by m={m}; this layer has {columns}.")


def wanda_scores(w: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ for an out x in weight."""
    return w.detach().abs().float() * column_norms.to(w.device)[None, :]


def row_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask with exactly round(sparsity·in) lowest scores pruned in every row (ties to the lower index)."""
    return ~smallest_k_mask(scores, round(sparsity * scores.shape[1]))


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive inputs of each row."""
    _check_nm(n, m, scores.shape[1])
    return n_of_m_keep(scores, n, m)


def wanda_masks(w: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    scores = wanda_scores(w, stats.column_norms())
    return nm_keep(scores, *nm) if nm else row_keep(scores, sparsity)


@torch.no_grad()
def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              percdamp: float = 0.01, blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(the updated weight, its keep-mask) for an out x in weight and its inputs' Hessian."""
    W = w.detach().float().clone()
    # the damped inverse's Cholesky factor in float64: activations with outlier features (real LLMs,
    # bf16 most of all) make H ill-conditioned enough that float32 loses positive definiteness
    H = hessian.double().clone()
    rows, cols = W.shape
    if nm:
        _check_nm(*nm, cols)
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except RuntimeError as exc:
        raise DSEEError(f"SparseGPT: the damped Hessian is not positive definite ({exc}); raise pruning.percdamp.") \
            from None
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        Q1, err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        diag = torch.diag(hinv1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if not nm:  # the block's own threshold: exactly round(sparsity·block) entries go
            saliency = W1 ** 2 / diag[None, :] ** 2
            prune1 = smallest_k_mask(saliency.flatten()[None], round(sparsity * saliency.numel()))[0].view_as(W1)
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:
                saliency = W1[:, i:i + nm[1]] ** 2 / diag[None, i:i + nm[1]] ** 2
                prune1[:, i:i + nm[1]] = ~nm_keep(saliency, *nm)
            col = W1[:, i]
            q = torch.where(prune1[:, i], torch.zeros_like(col), col)
            Q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            W1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]  # the OBS update of the columns still to come
            err1[:, i] = e
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the block's lazy update of the rest
    return W.to(w.dtype), keep
