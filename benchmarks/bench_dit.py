"""Transformer (Flux-like) models: Discover on a full-size Flux.1's attention, Apply's overhead, the families covered.

- flux_all_blocks_s: Discover's work on all 57 image-attention sites of a full-size Flux.1 (19 double blocks,
  38 single blocks, width 3072, 24 heads; random fp16 weights of the real shapes, count 10, whitened): the
  node's own loop (nodes/discover.py: discover_sites), weights read and converted as the node reads a
  patcher's. The model itself is built on the meta device (12 B parameters do not fit this machine), so only
  the sites' weights exist; flux_full_eigh_s: the baseline on the same weights, J formed and a full
  eigendecomposition of J^T J per site. The two run in turns (benchmarks.common.timed_in_turns: each round
  both, the order alternating), best of two each, so that the machine's drift reaches both sides of the ratio.
- flux_apply_overhead_ratio: time of a sampling run with a direction at every site over the unpatched model's, on
  a Flux-shaped model (Flux.1's blocks at their real width, 3072, and 24 heads, but one double and two single
  blocks: the ratio is per block) at a 16 x 16 latent (64 image tokens, 64 text tokens), euler, cfg 1, STEPS
  steps, built and run in inference mode as the host runs nodes (so the hooks map the direction through each
  linear once per run, and that is counted). The variants run in adjacent pairs, the order alternating; the
  figure is the median of the pairs' ratios, with a bootstrap 95% interval (flux_apply_overhead_ci95): a
  step's time on this kind of machine drifts by several percent from minute to minute, which the pairing
  cancels and a ratio of two separate minima does not. Beside it, the direct measure that noise does not
  blur: flux_apply_hooks_share, the share of a patched run's time spent in the pack's code (a profile of one
  run: the model-call wrapper's own time and every hooked linear's output shift, tensor work included), and
  flux_apply_overhead_ratio_profiled = 1 / (1 - share), the ratio it implies.
- families: the model families on which Discover, Apply Direction and DDIM Invert each ran in this run
  (tiny models built from the host's classes; tests/test_host_dit.py runs the same on each).
"""
import cProfile
import pstats
import time

import numpy as np
import torch

from benchmarks.common import PeakRss, arguments, full_eigh_gains, report, start_host, timed_in_turns
from benchmarks.measures import bootstrap_resamples, interval

COUNT, REPEATS, STEPS, APPLY_PAIRS = 10, 2, 6, 12
APPLY_SHAPE = {"depth": 1, "depth_single_blocks": 2, "context_in_dim": 64, "vec_in_dim": 64}
APPLY_LATENT = (1, 16, 16, 16)


def full_size_sites(host_layer, dits, device):
    """(sites {path: AttentionSite}, key_patches) of a full-size Flux.1: the model on the meta device, random fp16
    tensors for the weights the sites read (linear1 and linear2 whole, as a checkpoint stores them)."""
    import comfy.model_patcher
    config_class, full, _ = dits.FAMILIES["flux"]
    model_config = config_class(dict(full))
    model_config.set_inference_dtype(torch.float16, torch.float32)
    model = model_config.get_model({}, device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    sites, blocks = host_layer.attention_sites(patcher), host_layer.dit.sites(patcher)
    generator, key_patches = torch.Generator().manual_seed(0), {}
    for block in blocks.values():
        for path in (*(linear for linear, _ in block.linears), block.out):
            module = model.diffusion_model.get_submodule(path)
            shape = module.weight.shape
            key_patches[f"diffusion_model.{path}.weight"] = [(
                (torch.randn(shape, generator=generator) / shape[1] ** 0.5).half(), lambda w, inplace: w)]
            if module.bias is not None:
                key_patches[f"diffusion_model.{path}.bias"] = [(
                    0.02 * torch.randn(shape[0], generator=generator).half(), lambda w, inplace: w)]
        for norm in (block.q_norm, block.k_norm):
            key_patches[f"diffusion_model.{norm}"] = [(
                (1 + 0.1 * torch.randn(128, generator=generator)).half(), lambda w, inplace: w)]
    return sites, key_patches


def families_covered(host, dits) -> list:
    """Each tiny family through Discover, Apply Direction (sampled) and DDIM Invert."""
    import comfy.sample
    import comfy.samplers
    registry = host.nodes.NODE_CLASS_MAPPINGS
    covered = []
    for family in dits.FAMILIES:
        model = dits.build_dit(family, seed=1)
        latent_format, patch = model.get_model_object("latent_format"), model.model.diffusion_model.patch_size
        frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()  # Qwen-Image's video latents
        latent = torch.randn(1, latent_format.latent_channels, *frames, 4 * patch, 4 * patch,
                             generator=torch.Generator().manual_seed(2))
        conditioning = [[torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3)),
                         {"pooled_output": torch.zeros(1, 16)}]]
        directions = registry["DiscoverAttentionEigendirections"]().discover(model, "all", 2, "whitened", 1.0)[0]
        edited = registry["ApplyDirection"]().apply(model, directions, 0, "all", 0.5, 0.0, 1.0, "both")[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
        sample = comfy.sample.sample_custom(edited, latent, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                            conditioning, conditioning, torch.zeros_like(latent), seed=0)
        inverted = registry["DDIMInvert"]().invert(model, {"samples": latent}, 3, "simple", 1.0, 1, conditioning)[0]
        if torch.isfinite(sample).all() and torch.isfinite(inverted["samples"]).all():
            covered.append(type(model.model).__name__)
    return covered


def discovery(host_layer, dits, discover_sites, device) -> dict:
    """Discover's loop on the full-size Flux.1 sites beside the full-eigh baseline (the weights freed on return)."""
    sites, key_patches = full_size_sites(host_layer, dits, device)
    figures = {"flux_sites": len(sites)}

    def discover(_):
        params = {"count": COUNT, "method": "whitened", "token_variance": 1.0}
        return discover_sites(sites, key_patches, device, params)

    seconds, results = timed_in_turns({"node": discover,
                                       "eigh": lambda _: full_eigh_gains(sites, key_patches, device, COUNT)}, REPEATS)
    found, exact = results["node"], results["eigh"]
    figures["flux_all_blocks_s"] = round(seconds["node"], 3)
    figures["flux_full_eigh_s"] = round(seconds["eigh"], 3)
    with PeakRss() as memory:
        discover(REPEATS)  # once more, alone, for its memory
    figures["flux_discover_extra_peak_rss_mb"] = round(memory.extra_mb, 1)
    figures["flux_speedup_vs_full_eigh"] = round(figures["flux_full_eigh_s"] / figures["flux_all_blocks_s"], 2)
    figures["flux_max_relative_gain_error"] = round(max(
        float(((found[p].gains - g).abs() / g).max()) for p, g in exact.items()), 5)
    return figures


def apply_overhead(host, dits, host_layer) -> dict:
    """Patched over plain sampling time on the Flux-shaped model, in adjacent pairs of whole runs, and the
    share of a patched run spent in the pack's hooks."""
    import comfy.sample
    import comfy.samplers
    model = dits.build_dit("flux", seed=0, full_size=True, **APPLY_SHAPE)
    registry = host.nodes.NODE_CLASS_MAPPINGS
    directions = registry["DiscoverAttentionEigendirections"]().discover(model, "all", 2, "whitened", 1.0)[0]
    patched = registry["ApplyDirection"]().apply(model, directions, 0, "all", 0.5, 0.0, 1.0, "both")[0]
    generator = torch.Generator().manual_seed(0)
    conditioning = [[torch.randn(1, 64, 64, generator=generator),
                     {"pooled_output": torch.randn(1, 64, generator=generator)}]]
    noise = torch.randn(*APPLY_LATENT, generator=generator)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)

    def seconds(which):
        start = time.perf_counter()
        comfy.sample.sample_custom(which, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, conditioning,
                                   conditioning, torch.zeros_like(noise), disable_pbar=True, seed=0)
        return time.perf_counter() - start
    seconds(model), seconds(patched)  # loading and first-call costs out of the pairs
    runs = {"plain": [], "patched": []}
    for pair in range(APPLY_PAIRS):
        for name in ("plain", "patched") if pair % 2 == 0 else ("patched", "plain"):
            runs[name].append(seconds(model if name == "plain" else patched))
    share = hooks_share(seconds, patched, host_layer.dit)
    ratios = np.asarray(runs["patched"]) / np.asarray(runs["plain"])
    medians = np.median(ratios[bootstrap_resamples(len(ratios))], axis=1)
    return {"apply_model": "Flux.1's blocks at full width (3072, 24 heads): 1 double + 2 single",
            "apply_latent": list(APPLY_LATENT), "apply_steps": STEPS, "apply_pairs": APPLY_PAIRS,
            "flux_plain_run_s_median": round(float(np.median(runs["plain"])), 3),
            "flux_patched_run_s_median": round(float(np.median(runs["patched"])), 3),
            "flux_apply_overhead_ratio": round(float(np.median(ratios)), 4),
            "flux_apply_overhead_ci95": [round(v, 4) for v in interval(medians)],
            "flux_apply_pair_ratio_range": [round(float(ratios.min()), 4), round(float(ratios.max()), 4)],
            "flux_apply_hooks_share": round(share, 5),
            "flux_apply_overhead_ratio_profiled": round(1 / (1 - share), 4)}


def hooks_share(seconds, patched, dit_host) -> float:
    """The share of one patched run's time spent in the pack's code (cProfile): the wrapper around each model
    call less the model call it wraps, plus every hooked linear's output shift (its tensor work included)."""
    import comfy.patcher_extension
    profiler = cProfile.Profile()
    total = profiler.runcall(seconds, patched)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own, cumulative, callers)}

    def key(function):
        return function.__code__.co_filename, function.__code__.co_firstlineno, function.__code__.co_name
    wrapper, shift, executor = (key(f) for f in (dit_host.ShiftsDuringCalls.__call__, dit_host.OutputShift.__call__,
                                                  comfy.patcher_extension.WrapperExecutor.__call__))
    wrapped = stats[executor][4][wrapper][3]
    return (stats[wrapper][3] - wrapped + stats[shift][3]) / total


def main():
    args = arguments(__doc__)
    host = start_host(args.device)
    import comfy.model_management

    from harness.test_nodes import dits
    from semantic_directions.nodes import host as host_layer
    from semantic_directions.nodes.discover import discover_sites
    device = comfy.model_management.get_torch_device()
    figures = {"device": str(device), "threads": torch.get_num_threads(), "count": COUNT, "weights_dtype": "float16"}

    figures.update(discovery(host_layer, dits, discover_sites, device))

    with torch.inference_mode():
        figures.update(apply_overhead(host, dits, host_layer))
    figures["families"] = families_covered(host, dits)
    report(figures, args.json)


if __name__ == "__main__":
    main()
