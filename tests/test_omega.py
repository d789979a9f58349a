import threading

import pytest
import torch

from dsee_cli.errors import DSEEError
from dsee_cli.tuning.omega import PRESETS, cached_omega, find_omega, grebsmo, top_n


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


def test_reference_preset_is_the_reference_codes_settings():
    ref = PRESETS["reference"]
    assert (ref.rank_start, ref.rank_step, ref.outer_iters, ref.inner_iters) == (1, 5, 100, 2)
    assert ref.threshold == 0.01 and not ref.soft and ref.reset_sparse and ref.sparse_card is None
    assert ref.power_iters == 0


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


def test_random_is_seeded():
    x, _ = planted()
    one = find_omega({"a": x}, 16, "random", PRESETS["fast"])["a"]
    two = find_omega({"a": x}, 16, "random", PRESETS["fast"])["a"]
    assert torch.equal(one, two)


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


def test_reference_preset_at_full_rank_warns_that_omega_is_arbitrary(caplog):
    """Below 496 dims the reference schedule reaches full rank: S' = 0 and Ω means nothing."""
    from dataclasses import replace

    x = torch.randn(24, 24)
    with caplog.at_level("WARNING", logger="dsee"):
        idx = find_omega({"w": x}, 4, "grebsmo", replace(PRESETS["reference"], outer_iters=6))["w"]
    assert idx.tolist() == [0, 1, 2, 3]
    assert "arbitrary" in caplog.text
