import threading

import pytest
import torch

from dsee_cli.errors import DSEEError
from dsee_cli.tuning.omega import PRESETS, cache_key, cached_omega, find_omega, grebsmo, top_n


def planted(m=256, n=256, rank=4, spikes=16, seed=0, fool_magnitude=False):
    """Low rank + `spikes` large off-subspace entries + small noise. Returns (X, spike flat indices).

    With fool_magnitude, the low-rank part has a few very large rows, so the largest |X| are
    low-rank entries rather than the spikes.
    """
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
    if fool_magnitude:
        u[:6] *= 8.0
    low = u @ v / rank**0.5
    idx = torch.randperm(m * n, generator=g)[:spikes]
    s = torch.zeros(m * n)
    s[idx] = (3.0 + torch.rand(spikes, generator=g)) * torch.sign(torch.randn(spikes, generator=g))
    x = low + s.view(m, n) + 0.01 * torch.randn(m, n, generator=g)
    return x, set(idx.tolist())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fool", [False, True])
def test_grebsmo_recovers_planted_spikes(seed, fool):
    x, spikes = planted(seed=seed, fool_magnitude=fool)
    found = set(find_omega({"w": x}, 16, "grebsmo", PRESETS["fast"])["w"].tolist())
    assert len(found & spikes) / len(spikes) >= 0.9


def reference_loop(x: torch.Tensor, n: int, outer_iters: int = 100, seed: int = 0) -> set[int]:
    """Algorithm 1 as the reference code runs it, written plainly and independently of ours: the
    rank starts at 1 and grows by 5 each outer step (new rows of V random), 2 inner iterations, S
    reset at each outer step, U = Q of QR((X - S) Vᵀ) (Householder), V = Uᵀ (X - S), S = X - UV
    hard-thresholded at 0.01; Ω: the n largest |S|. The random rows are drawn as ours draws them
    (one generator of `seed`), so the two can be compared position for position."""
    gen = torch.Generator().manual_seed(seed)
    m, k = x.shape
    v = torch.randn(1, k, generator=gen)
    for outer in range(outer_iters):
        s = torch.zeros_like(x)
        for _ in range(2):
            u, _ = torch.linalg.qr((x - s) @ v.t())
            v = u.t() @ (x - s)
            residual = x - u @ v
            s = residual * (residual.abs() > 0.01)
        if outer + 1 < outer_iters:
            v = torch.cat([v, torch.randn(5, k, generator=gen)])
    return set(s.abs().flatten().topk(n).indices.tolist())


@pytest.mark.parametrize("outer,spikes_found", [(2, [16, 16, 16]), (3, [14, 13, 14]), (4, [8, 6, 11])])
def test_reference_preset_finds_what_the_reference_algorithm_finds(outer, spikes_found):
    """The reference preset (its constants, for `outer` outer steps: rank 6, 11, 16) equals the
    plain loop on planted matrices (256², rank 4 + 16 spikes, seeds 0-2), and, as the README says,
    loses planted spikes as its rank grows past the low-rank part. Not compared at the preset's full
    100 steps: the rank then reaches 496, every spike is inside UV on any matrix a test can afford,
    and Ω is a set of noise-level residuals just above the threshold, which floating-point order
    decides (measured at 768², noise 0.05: 12 of 16 positions shared, S′ within 0.02)."""
    from dataclasses import replace

    settings = replace(PRESETS["reference"], outer_iters=outer)
    found = []
    for seed in range(3):
        x, spikes = planted(seed=seed)
        ours = set(find_omega({"w": x}, 16, "grebsmo", settings, "reference")["w"].tolist())
        assert ours == reference_loop(x, 16, outer), seed
        found.append(len(ours & spikes))
    assert found == spikes_found


@pytest.mark.parametrize("rank,least,most", [(2, 13, 16), (4, 16, 16), (6, 0, 10), (8, 8, 16)])
def test_the_fast_preset_at_planted_ranks_other_than_its_rank_start(rank, least, most):
    """Measured, not tuned (256 x 256, 16 spikes of ±3, noise 0.01, 6 seeds; spikes found per seed):
    rank 2: 14-16, rank 4 (its rank_start): 16 in every seed, rank 6: 0-9 (at rank 4 the largest
    residual entries are the low-rank part's, and at 10 UV has room for spikes too), rank 8: 9-15.
    The README's bench at 768² and rank 8 finds 23 %. A change that moves these is a finding."""
    found = []
    for seed in range(6):
        x, spikes = planted(rank=rank, seed=seed)
        found.append(len(set(find_omega({"w": x}, 16, "grebsmo", PRESETS["fast"])["w"].tolist()) & spikes))
    assert least <= min(found) and max(found) <= most, found


@pytest.mark.parametrize("seed", range(3))
def test_magnitude_is_fooled_where_grebsmo_is_not(seed):
    x, spikes = planted(fool_magnitude=True, seed=seed)
    greb = set(find_omega({"w": x}, 16, "grebsmo", PRESETS["fast"])["w"].tolist())
    mag = set(find_omega({"w": x}, 16, "magnitude", PRESETS["fast"])["w"].tolist())
    assert len(greb & spikes) >= 15
    assert len(mag & spikes) <= 8


def test_grebsmo_batched_equals_one_by_one():
    xs = [planted(seed=s)[0] for s in range(3)]
    batched = grebsmo(torch.stack(xs), PRESETS["fast"])
    for i, x in enumerate(xs):
        assert torch.allclose(batched[i], grebsmo(x, PRESETS["fast"]), atol=1e-4)


def test_parallel_split_gives_the_same_sparse_part():
    from dsee_cli.tuning.omega import grebsmo_parallel

    xs = torch.stack([planted(seed=s)[0] for s in range(5)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = grebsmo_parallel(xs, PRESETS["fast"])
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(split, grebsmo(xs, PRESETS["fast"]), atol=1e-4)


def test_top_n_is_exact_with_deterministic_ties():
    scores = torch.zeros(2, 4, 5)
    scores[0, 0, 0] = 1.0
    idx = top_n(scores, 3)
    assert idx.shape == (2, 3)
    assert idx[0].tolist() == [0, 1, 2]  # the spike, then ties broken by lowest index
    assert idx[1].tolist() == [0, 1, 2]
    with pytest.raises(DSEEError, match="larger than the matrix"):
        top_n(scores, 21)


@pytest.mark.parametrize("method", ["grebsmo", "magnitude", "random"])
def test_every_method_gives_exactly_n_distinct_positions(method):
    x, _ = planted()
    idx = find_omega({"a": x, "b": x.t().contiguous()}, 16, method, PRESETS["fast"])
    for v in idx.values():
        assert len(set(v.tolist())) == 16


def test_random_omega_follows_the_run_seed_unless_omega_seed_is_set():
    from .helpers import compose

    x, _ = planted()

    def omega(*overrides):
        cfg = compose("omega=random", *overrides)
        return find_omega({"a": x}, 16, "random", cfg.omega.grebsmo(cfg.seed))["a"]
    assert torch.equal(omega("seed=1"), omega("seed=1"))
    assert not torch.equal(omega("seed=1"), omega("seed=2"))  # Fig. 2's seeds draw different Ω
    assert torch.equal(omega("seed=1", "omega.seed=7"), omega("seed=2", "omega.seed=7"))
    greb = compose("omega=grebsmo", "seed=3")  # GreBsmo's Ω stays a property of the weights
    assert greb.omega.grebsmo(greb.seed).seed == 0
    # and the Ω cache keeps one entry per draw
    keys = {cache_key({"a": x}, 16, "random", compose("omega=random", f"seed={s}").omega.grebsmo(s)) for s in (1, 2)}
    assert len(keys) == 2


def test_cache_computes_once_and_survives_concurrent_jobs(tmp_path):
    weights = {f"layer{i}": planted(seed=i)[0] for i in range(4)}
    results = []

    def job():
        results.append(cached_omega(weights, 16, "grebsmo", PRESETS["fast"], tmp_path))

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not r.from_cache for r in results) == 1  # exactly one job computed
    for r in results:
        for k in weights:
            assert torch.equal(r.indices[k], results[0].indices[k])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    # a different finder setting is a different cache entry
    other = cached_omega(weights, 8, "grebsmo", PRESETS["fast"], tmp_path)
    assert not other.from_cache and len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("shape", [(24, 24), (384, 384)])  # MiniLM's 384: the reference rank reaches 496
def test_grebsmo_that_would_reach_full_rank_is_an_error_naming_the_matrix(shape):
    """Never positions 0..N-1 in silence: checked from the shapes, before any work."""
    import time

    started = time.perf_counter()
    named = rf"layer.0.query \(shape \({shape[0]}, {shape[1]}\)\).*'reference'.*omega.rank="
    with pytest.raises(DSEEError, match=named):
        find_omega({"layer.0.query": torch.randn(*shape)}, 4, "grebsmo", PRESETS["reference"], "reference")
    assert time.perf_counter() - started < 1.0


def test_an_all_zero_sparse_part_is_an_error_not_positions_0_to_n():
    from dataclasses import replace

    x = torch.randn(24, 24) * 1e-3  # every residual entry below the threshold
    with pytest.raises(DSEEError, match="below the threshold"):
        find_omega({"w": x}, 4, "grebsmo", replace(PRESETS["reference"], outer_iters=2, rank=5), "reference")
