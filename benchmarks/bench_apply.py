"""Apply Direction and the Asyrp sampler on an SD1.5-sized UNet (random weights) at a small latent.

Side by side in one run, alternating the variants' order and keeping each one's best time per
step, timed between the sampler's step callbacks (so model loading and conditioning set-up, which
differ with the order the variants run in, stay out):
- overhead_ratio: time per sampling step with a direction applied at all 16 attention layers over
  the whole schedule, over the unpatched model (euler, cfg 5, so cond and uncond run batched);
- asyrp_unet_calls_per_step: UNet forward calls per edited step of the Asyrp sampler;
- asyrp_ratio: Asyrp sampler time over plain DDIM time, both over an edit range covering every step;
- weight_bytes_changed: bytes of the model's parameters that differ after all of it;
- extra_peak_rss_mb: peak resident memory of patched sampling minus that of unpatched sampling.
"""
import hashlib
import statistics
import time

import torch

from benchmarks.common import PeakRss, arguments, report, start_host, unet_precision

STEPS, LATENT, REPEATS = 5, 16, 3


def main():
    args = arguments(__doc__)
    host = start_host(args.device)
    import comfy.sample
    import comfy.samplers

    from harness.test_nodes.unets import build_unet
    registry = host.nodes.NODE_CLASS_MAPPINGS
    model = build_unet("sd15", full_size=True, **unet_precision(args.device))
    model_mb = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2 ** 20
    before = {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).digest()
              for k, v in model.model.state_dict().items()}
    directions = registry["DiscoverAttentionEigendirections"]().discover(model, "all", 2, "whitened", 1.0)[0]
    patched = registry["ApplyDirection"]().apply(model, directions, 0, "all", 0.5, 0.0, 1.0, "both")[0]
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    noise = torch.randn(1, 4, LATENT, LATENT, generator=generator)
    latent = torch.zeros_like(noise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)

    def run(which, sampler, cfg=5.0):
        """Median seconds between consecutive step callbacks."""
        stamps = []
        comfy.sample.sample_custom(which, noise, cfg, sampler, sigmas, positive, negative, latent,
                                   callback=lambda *a: stamps.append(time.perf_counter()), disable_pbar=True, seed=0)
        return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))

    euler, ddim = comfy.samplers.sampler_object("euler"), comfy.samplers.sampler_object("ddim")
    asyrp = registry["AsyrpSampler"]().get_sampler(0.0, 1.0)[0]
    best, peaks = {}, {}
    variants = [("plain", model, euler), ("patched", patched, euler), ("ddim", patched, ddim),
                ("asyrp", patched, asyrp)]
    for repeat in range(REPEATS):
        for name, which, sampler in variants if repeat % 2 == 0 else variants[::-1]:  # no order advantage
            with PeakRss() as memory:
                per_step = run(which, sampler)
            best[name] = min(best.get(name, float("inf")), per_step)
            peaks[name] = max(peaks.get(name, 0.0), memory.extra_mb)
    calls = []
    hook = model.model.diffusion_model.register_forward_hook(lambda *a: calls.append(1))
    run(patched, asyrp)
    hook.remove()
    after = {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).digest()
             for k, v in model.model.state_dict().items()}
    changed = sum(model.model.state_dict()[k].numel() * model.model.state_dict()[k].element_size()
                  for k in before if before[k] != after[k])
    report({
        "device": args.device, "threads": torch.get_num_threads(), "latent": [1, 4, LATENT, LATENT],
        "steps": STEPS, "model_dtype": str(model.model.get_dtype()), "model_mb": round(model_mb, 1),
        "plain_step_s": round(best["plain"], 4), "patched_step_s": round(best["patched"], 4),
        "overhead_ratio": round(best["patched"] / best["plain"], 4),
        "asyrp_unet_calls_per_step": len(calls) / STEPS,
        "asyrp_ratio": round(best["asyrp"] / best["ddim"], 3),
        "weight_bytes_changed": changed,
        "extra_peak_rss_mb": round(peaks["patched"] - peaks["plain"], 1),
        "extra_peak_rss_limit_mb": round(model_mb / 100, 1),
    }, args.json)


if __name__ == "__main__":
    main()
