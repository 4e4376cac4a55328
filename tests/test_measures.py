"""The semantics benchmark's instruments on cases whose answer is known: the oracle denoiser
(world/oracle.py), the bootstrap intervals and the ceiling directions (benchmarks/measures.py)."""
import numpy as np
import pytest

from benchmarks.measures import bootstrap_interval, bootstrap_resamples, ceiling_directions, effect, purity, seed_slopes
from world.oracle import posterior_mean

PATTERN = np.random.default_rng(0).standard_normal((2, 24))


def linear_draw(factors: np.ndarray) -> np.ndarray:
    """A world whose image is linear in its factors: [N, 2] -> [N, 24]."""
    return factors @ PATTERN


def exact_posterior_mean(noisy: np.ndarray, sigma: float, grid: int = 801) -> tuple:
    """(E[f | noisy], posterior standard deviations) for the linear world, by quadrature in float64."""
    axis = np.linspace(0, 1, grid)
    f = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    log_likelihood = -np.square(linear_draw(f) - noisy).sum(1) / (2 * sigma ** 2)
    weights = np.exp(log_likelihood - log_likelihood.max())
    weights /= weights.sum()
    mean = weights @ f
    return mean, np.sqrt(weights @ np.square(f - mean))


@pytest.mark.parametrize("sigma", [0.3, 2.0])
def test_the_oracle_finds_the_posterior_mean_of_a_world_it_can_only_draw(sigma):
    """A narrow posterior (sigma 0.3, far from the prior) and a broad one cut by the unit square's edge
    (sigma 2): the tempered sampler's mean matches quadrature within a few Monte Carlo errors."""
    truth = np.array([0.8, 0.15])
    noisy = linear_draw(truth[None])[0] + sigma * np.random.default_rng(1).standard_normal(24)
    mean, spread = exact_posterior_mean(noisy, sigma)
    result = posterior_mean(noisy, sigma, draw=linear_draw, dims=2, particles=1024, seed=3)
    factors = np.linalg.lstsq(PATTERN.T, result.mean, rcond=None)[0]  # the mean image is linear in E[f]
    print(f"sigma {sigma}: exact {mean}, sd {spread}; oracle {factors}, {result.stages} stages, "
          f"acceptance {result.acceptance:.2f}, {result.distinct} distinct")
    assert np.all(np.abs(factors - mean) < 4 * spread / np.sqrt(result.distinct / 4))
    assert result.stages >= 1 and result.distinct > 200


def test_the_oracles_runs_in_worker_processes_are_the_runs_made_here():
    """world.quality spreads the oracle's independent runs over a process per core: the same means, in order."""
    from world.oracle import posterior_means
    from world.quality import generator_faces, noised
    noisy = noised(generator_faces(1), 8.0)[0]
    tasks = [(noisy, 8.0, seed) for seed in (1, 2)]
    for parallel, (y, sigma, seed) in zip(posterior_means(tasks), tasks):
        np.testing.assert_array_equal(parallel, posterior_mean(y, sigma, seed=seed).mean)


def test_the_oracle_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match="finite"):
        posterior_mean(np.full(24, np.nan), 1.0, draw=linear_draw, dims=2)
    with pytest.raises(ValueError, match="sigma"):
        posterior_mean(np.zeros(24), 0.0, draw=linear_draw, dims=2)


def test_slopes_effect_and_purity_of_a_known_linear_response():
    alphas = (-0.5, -0.1, 0.2, 0.5)
    base = np.random.default_rng(2).random((3, 4))
    truth = np.array([0.3, -0.1, 0.0, 0.05])
    swept = base[:, None] + np.asarray(alphas)[None, :, None] * truth
    slopes = seed_slopes(base, swept, alphas)
    np.testing.assert_allclose(slopes, np.broadcast_to(truth, (3, 4)), atol=1e-12)
    assert effect(truth) == pytest.approx(0.3)
    assert purity(truth) == pytest.approx(0.3 / 0.45) and purity(truth, 1) == pytest.approx(0.1 / 0.45)


def test_bootstrap_intervals_cover_the_true_ratio_as_often_as_they_claim():
    """Two directions' per-seed slopes drawn around known means (ratio of effects 2): over 300 repeated
    experiments of 16 seeds, the 95% interval covers 2 in 88% to 99% of them, and it is the same
    interval for the same resamples."""
    rng = np.random.default_rng(4)
    resamples = bootstrap_resamples(16, count=400, seed=5)

    def ratio(means):
        return effect(means["edit"]) / effect(means["random"])
    covered = 0
    for _ in range(300):
        per_seed = {"edit": np.array([0.2, 0.02]) + 0.05 * rng.standard_normal((16, 2)),
                    "random": np.array([0.1, 0.01]) + 0.02 * rng.standard_normal((16, 2))}
        low, high = bootstrap_interval(ratio, per_seed, resamples)
        covered += low <= 2.0 <= high
    print("coverage", covered / 300)
    assert 0.88 <= covered / 300 <= 0.99
    assert bootstrap_interval(ratio, per_seed, resamples) == [low, high]


def test_ceiling_directions_are_the_strongest_and_the_purest_first_order_edits():
    """For a known Jacobian G [7, 12]: the strongest direction for factor g is G_g normalised; the pure one
    moves no other factor to first order (purity 1) and moves g more than any other such unit direction
    (random ones projected the same way never beat it); a factor whose gradient lies in the others' span
    has no pure direction."""
    rng = np.random.default_rng(6)
    gradients = rng.standard_normal((7, 12))
    directions = ceiling_directions(gradients)
    def others(g):
        return np.delete(gradients, g, 0)
    for g in range(7):
        strongest, pure = directions[("strongest", g)], directions[("pure", g)]
        np.testing.assert_allclose(strongest, gradients[g] / np.linalg.norm(gradients[g]), atol=1e-12)
        np.testing.assert_allclose(others(g) @ pure, 0, atol=1e-10)
        assert purity(gradients @ pure, g) == pytest.approx(1.0)
        null_space = np.linalg.svd(others(g))[2][6:]  # unit directions that move no other factor
        candidates = rng.standard_normal((200, 6)) @ null_space
        candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
        assert abs(gradients[g] @ pure) >= np.abs(candidates @ gradients[g]).max() - 1e-12
    tangled = gradients.copy()
    tangled[3] = 0.5 * tangled[0] - 2 * tangled[5]
    assert ceiling_directions(tangled)[("pure", 3)] is None
    assert ceiling_directions(tangled)[("pure", 1)] is not None


@pytest.mark.parametrize("site", ["output_blocks.1.1.transformer_blocks.0.attn1", "h_space"])
def test_the_ceilings_gradient_is_the_slope_apply_direction_produces(host, site):
    """The ceiling's Jacobian, differentiated through the benchmark's own sampling loop, predicts what
    the pack's Apply Direction does through the host's sampler (ddim; Asyrp for h-space) along a random
    unit direction: the central difference at alpha +-0.01 on the regressor's continuous reading, 2
    seeds, agrees within 5% of the largest factor change (measured: within 1%; at alpha 0.05 h-space is
    already 13% off, the third-order term, which is why the benchmark sweeps h-space over smaller alphas)."""
    import torch

    from benchmarks.bench_semantics import World, sampler_of, unit_set
    from semantic_directions.directions import directionset
    from semantic_directions.nodes.host import made_for
    world = World(host, seeds=2)
    gradients = world.factor_gradients(site)
    direction = np.random.default_rng(7).standard_normal(gradients.shape[1])
    direction /= np.linalg.norm(direction)
    dset = unit_set(directionset, made_for(world.model), {site: direction[None]}, "test")
    alpha = 0.01
    images = world.sweep((-alpha, alpha), (dset, 0, site), sampler_of(world, site))
    with torch.no_grad():
        readings = world.regressor(images.reshape(-1, 32, 32, 3).permute(0, 3, 1, 2) * 2 - 1).reshape(2, 2, -1)
    measured = ((readings[:, 1] - readings[:, 0]).mean(0) / (2 * alpha)).double().numpy()
    predicted = gradients @ direction
    print("predicted", predicted.round(4), "measured", measured.round(4))
    assert np.abs(measured - predicted).max() < 0.05 * np.abs(predicted).max()


def test_a_cached_sweep_reads_back_equal_without_sampling_again(host, tmp_path):
    """A full run's SweepCache: a direction measured once is read back with the same slopes and record (its
    index as asked) and without sampling; another direction, other alphas or seeds are other entries; an entry
    cut short by a crash is measured again."""
    from benchmarks.bench_semantics import SweepCache, World, measure_direction, unit_set
    from semantic_directions.directions import directionset
    from semantic_directions.nodes.host import made_for
    world = World(host, seeds=2)
    base_images = world.sweep([0.0])
    base_factors = world.factors(base_images)[:, 0]
    site, alphas = "output_blocks.1.1.transformer_blocks.0.attn1", (-0.5, 0.5)
    width = world.model.model.diffusion_model.get_submodule(site).to_q.in_features
    vectors = np.random.default_rng(3).standard_normal((2, width))
    dset = unit_set(directionset, made_for(world.model), {site: vectors}, "test")
    cache = SweepCache(world, tmp_path)
    slopes, record = measure_direction(world, dset, site, 0, base_images, base_factors, alphas, cache)
    stored = list(tmp_path.glob("*.json"))
    assert len(stored) == 1 and cache.hits == 0

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached sweep was sampled again")
    world.sweep = no_sampling
    again, again_record = measure_direction(world, dset, site, 0, base_images, base_factors, alphas, cache)
    np.testing.assert_array_equal(again, slopes)
    assert again_record == record and cache.hits == 1
    assert len({cache.path(dset, site, 0, alphas, 2), cache.path(dset, site, 1, alphas, 2),
                cache.path(dset, site, 0, (-0.25, 0.25), 2), cache.path(dset, site, 0, alphas, 3)}) == 4
    stored[0].write_text(stored[0].read_text()[:20])  # cut short by a crash: measured again, not an error
    world.sweep = World.sweep.__get__(world)
    assert measure_direction(world, dset, site, 0, base_images, base_factors, alphas, cache)[1] == record


def test_a_cached_direction_set_reads_back_equal_without_making_it_again(host, tmp_path):
    """A full run keeps its slow direction sets (pairs, Jacobians, ceilings) as the pack's direction files: made
    once, read back equal (vectors, method, params) without calling the recipe; other inputs, another name are
    other entries."""
    import torch

    from benchmarks.bench_semantics import SweepCache, World, unit_set
    from semantic_directions.directions import directionset
    from semantic_directions.nodes.host import made_for
    world = World(host, seeds=2)
    cache = SweepCache(world, tmp_path)
    site, made = "h_space", []

    def make():
        made.append(1)
        dset = unit_set(directionset, made_for(world.model), {site: np.random.default_rng(4).standard_normal((3, 64))},
                        "ceiling")
        dset.params["meaning"] = [["pure", 2], ["strongest", 5], ["pure", 6]]
        return dset
    first = cache.direction_set("ceiling h_space", make, [2, 5, 6])
    again = cache.direction_set("ceiling h_space", make, [2, 5, 6])
    assert len(made) == 1 and cache.set_hits == 1
    assert torch.equal(again.sites[site].vectors, first.sites[site].vectors)
    assert (again.method, again.params, again.model) == (first.method, first.params, first.model)
    cache.direction_set("ceiling h_space", make, [2, 5])
    cache.direction_set("ceiling middle", make, [2, 5, 6])
    assert len(made) == 3 and len(list((tmp_path / "sets").glob("*.safetensors"))) == 3


def test_the_readme_tables_quote_the_report():
    """benchmarks/semantics_tables.py: each figure lands in its column, random rows carry no ratios, a pair's missing
    ceiling reads '-'."""
    from benchmarks.semantics_tables import methods_table, named_table, own_face_table, sites_table
    site = "output_blocks.1.1.transformer_blocks.0.attn1"

    def method(factor, effect, ratio):
        return {"best": {"site": site, "index": 2, "factor": factor, "effect": effect, "purity": 0.456},
                "purity_vs_ceiling": 0.812, "best_ratio_vs_random": ratio, "best_ratio_ci95": [0.75, 12.0],
                "median_ratio_vs_random": 2.95, "median_ratio_ci95": [1.8, 3.6], "inverted_transfer": 0.843}
    named = {"site": "h_space", "named_slope": 0.4512, "ratio_vs_random": 1.3, "ratio_ci95": [0.6, 1.7],
             "purity_vs_ceiling": None, "ceiling_ratio_vs_random": None}
    report = {"methods": {"whitened": method("background", 0.4154, 3.14), "random-attention": method("smile", 0.1, 1)},
              "sites": {site: {"methods": {"whitened": {"ratio_vs_random": 3.14}},
                               "ceiling": {"smile": {"effect": 0.2}, "background": {"effect": 0.4812}}}},
              "pair_named": {"smile": named}, "pair_matched_named": None, "pair_conditional_named": {"smile": named},
              "own_face_edits": {"h_space": {"faces": 8, "ratio_median": 1.39, "ratio_range": [0.9, 2.0],
                                             "jacobian_effect_median": 1.7698, "reference": "hspace-pca",
                                             "reference_effect_median": 1.2696}}}
    assert methods_table(report)[2:] == [
        "| whitened | output_blocks.1 #2: background | 0.415 | 0.46 (0.81) | 3.1x (0.75 to 12.0) | 3.0x (1.8 to 3.6) "
        "| 0.84 |",
        "| random (attention) | output_blocks.1 #2: smile | 0.100 | 0.46 |  |  | 0.84 |"]
    assert sites_table(report)[2:] == ["| output_blocks.1 | 3.1x | 0.48 (background) |"]
    assert named_table(report)[0].count("|") == 5  # factor, two kinds of pair (matched absent), ceilings
    pair = "h-space, 0.451, 1.3x (0.6 to 1.7)"
    assert named_table(report)[2:] == [f"| smile | {pair} | {pair} | - / - |"]
    assert own_face_table(report)[2:] == ["| h-space | 8 | 1.4x (0.9 to 2.0) | 1.770 | h-space PCA | 1.270 |"]


def test_timed_in_turns_alternates_and_keeps_each_best(monkeypatch):
    """Each round calls every function once, the order reversed every other round, so that a drift of the
    machine's speed reaches both sides of a ratio; each function's figure is its fastest call (on a clock the
    functions advance themselves, so the test does not depend on this machine's timing)."""
    from benchmarks import common
    clock, calls = [0.0], []
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def taking(name, seconds):
        def run(i):
            calls.append((name, i))
            clock[0] += seconds[i]
            return i
        return run
    best, results = common.timed_in_turns({"a": taking("a", [3.0, 1.0, 2.0]), "b": taking("b", [0.5, 2.0, 1.0])}, 3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert results == {"a": 2, "b": 2} and best == {"a": 1.0, "b": 0.5}
