"""DDIM inversion round trips on two models, in one run: the Gaussian-prior stand-in and the faces world's model.

Each round trip inverts and samples back as KSamplerAdvanced does with add_noise disabled (the same steps
and scheduler, cfg 1); the error is the relative error in latent space, |sampled back - original| /
|original| over the whole batch.

1. The stand-in: a UNet of SD1.5's block structure at the tests' small widths (--full-size: SD1.5's
   own widths, 860 M parameters, far too slow for 2 CPU cores) at a 16 x 16 latent, 50 steps, normal
   scheduler, the pack's DDIM Invert at refine 0 to 3, sampled back with ddim. Random weights alone are no
   denoiser (their prediction ignores the input), so the UNet is wrapped as the tests do
   (GaussianPriorDenoiser): the exact denoiser of Gaussian data plus 0.05 of the real UNet's correction.
   Also reports the time of an inversion over the time of sampling back, measured side by side.
2. The trained faces world model (FacesWorldLoader: world/model.py, its empty conditioning and its identity
   pixel VAE, so the latent is the image in [-1, 1]): 8 held-out generator faces (seed
   world.regressor.HELD_OUT_SEED), 20 and 50 steps, normal and karras schedulers, five inversions
   (harness/inversion.py) with their round-trip error, PSNR (dB, images in [0, 1]) and model calls per step
   and image, counted at the UNet:
   - "plain": DDIM Invert at refine 0, plain DDIM inversion;
   - "default": DDIM Invert at its default refine (adaptive, Anderson-accelerated; docs/math.md);
   - "fixed_point": the pack's previous default at the same refine (1 + refine calls every step);
   - "unsampler": the Unsampler's dpmpp_2m at the same steps, sampled back with dpmpp_2m;
   - "unsampler_equal_calls": the same with as many steps as the default made model calls.
"""
import sys
import time

import torch

from benchmarks.common import UNetRows, arguments, report, start_host
from harness.inversion import fixed_point_sampler, invert_with, sample_back, schedule, unsample

STEPS, LATENT = 50, 16
REFINES = (0, 1, 2, 3)
TRAINED_STEPS, TRAINED_SCHEDULERS, TRAINED_IMAGES = (20, 50), ("normal", "karras"), 8


def relative_error(back, original):
    return float((back.to(original) - original).norm() / original.norm())


def psnr(back, original):
    """Mean PSNR over the batch of images in [-1, 1] (the same as of the [0, 1] images they encode)."""
    mse = ((back.to(original) - original) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4 / mse)).mean())


def stand_in(host, default_refine, full_size):
    from harness.test_nodes.unets import build_unet, with_gaussian_prior
    model = with_gaussian_prior(build_unet("sd15", full_size=full_size))
    context = 768 if full_size else 32
    conditioning = [[torch.randn(1, 77, context, generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)) / 0.18215}
    node = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()
    node.invert(model, latent, 1, "normal", 1.0, 0, positive=conditioning)  # the first sampling loads the model
    results = {}
    for refine in REFINES:
        with UNetRows(model) as counter:
            start = time.perf_counter()
            inverted = node.invert(model, latent, STEPS, "normal", 1.0, refine, positive=conditioning)[0]["samples"]
            invert_seconds = time.perf_counter() - start
        start = time.perf_counter()
        back = sample_back(model, inverted, conditioning, STEPS, "normal")
        results[refine] = {"error": relative_error(back, latent["samples"]), "rows": counter.rows,
                           "invert_s": invert_seconds, "sample_s": time.perf_counter() - start}
    errors = {refine: r["error"] for refine, r in results.items()}
    sample_time = min(r["sample_s"] for r in results.values())
    return {
        "stand_in_unet": "sd15 " + ("full size" if full_size else "small (model_channels 32)"),
        "steps": STEPS, "latent": [1, 4, LATENT, LATENT], "default_refine": default_refine,
        "recon_rel_error_plain": round(errors[0], 6),
        "recon_rel_error_refined": round(errors[default_refine], 8),
        "recon_rel_error_by_refine": {k: round(v, 8) for k, v in errors.items()},
        "recon_error_reduction_refined": round(1 - errors[default_refine] / errors[0], 6),
        "unet_calls": results[default_refine]["rows"],
        "invert_over_sample_time": round(results[default_refine]["invert_s"] / sample_time, 3),
        "invert_over_sample_time_by_refine": {k: round(r["invert_s"] / sample_time, 3) for k, r in results.items()},
    }


def trained(host, default_refine):
    from world.faces import SIZE, dataset
    from world.regressor import HELD_OUT_SEED
    model, vae, conditioning = host.nodes.NODE_CLASS_MAPPINGS["FacesWorldLoader"]().load()
    pixels, _ = dataset(TRAINED_IMAGES, HELD_OUT_SEED, SIZE)
    original = vae.encode(torch.from_numpy(pixels).float() / 255)  # the identity VAE: [-1, 1] pixels
    node = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()

    def measured(invert, back_steps, sampler="ddim"):
        with UNetRows(model) as counter:
            inverted = invert()
        back = sample_back(model, inverted, conditioning, back_steps, scheduler, sampler)
        return {"error": round(relative_error(back, original), 7), "psnr_db": round(psnr(back, original), 2),
                "calls_per_step": round(counter.rows / (TRAINED_IMAGES * back_steps), 3), "calls": counter.rows}

    def by_node(refine):
        return node.invert(model, {"samples": original}, steps, scheduler, 1.0, refine, conditioning)[0]["samples"]
    round_trips = {}
    for steps in TRAINED_STEPS:
        for scheduler in TRAINED_SCHEDULERS:
            table = {
                "plain": measured(lambda: by_node(0), steps),
                "default": measured(lambda: by_node(default_refine), steps),
                "fixed_point": measured(lambda: invert_with(model, fixed_point_sampler(default_refine), original,
                                                            schedule(model, scheduler, steps).flip(0), conditioning),
                                        steps),
                "unsampler": measured(lambda: unsample(model, original, conditioning, steps, scheduler), steps,
                                      "dpmpp_2m")}
            equal = round(table["default"]["calls"] / TRAINED_IMAGES)
            table["unsampler_equal_calls"] = measured(lambda: unsample(model, original, conditioning, equal, scheduler),
                                                      equal, "dpmpp_2m")
            round_trips[f"{steps} {scheduler}"] = {method: {k: v for k, v in row.items() if k != "calls"}
                                                   for method, row in table.items()}
    def error(steps, scheduler, method):
        return round_trips[f"{steps} {scheduler}"][method]["error"]
    reduction = {steps: min(error(steps, s, "plain") / error(steps, s, "default") for s in TRAINED_SCHEDULERS)
                 for steps in TRAINED_STEPS}
    karras_20 = round_trips["20 karras"]
    return {"trained_model": "faces world (FacesWorldLoader)", "trained_images": TRAINED_IMAGES,
            "trained_held_out_seed": HELD_OUT_SEED, "trained_latent": list(original.shape),
            **{f"trained_error_reduction_{steps}": round(value, 2) for steps, value in reduction.items()},
            "trained_model_evaluations_per_step": round(
                sum(t["default"]["calls_per_step"] for t in round_trips.values()) / len(round_trips), 3),
            "equal_calls_psnr_gain_db": round(karras_20["default"]["psnr_db"]
                                              - karras_20["unsampler_equal_calls"]["psnr_db"], 2),
            "trained_round_trips": round_trips}


def main():
    full_size = "--full-size" in sys.argv
    if full_size:
        sys.argv.remove("--full-size")
    args = arguments(__doc__)
    host = start_host(args.device)
    default_refine = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"].INPUT_TYPES()["required"]["refine"][1]["default"]
    start = time.perf_counter()
    figures = {"device": args.device, "threads": torch.get_num_threads(), **stand_in(host, default_refine, full_size)}
    stand_in_seconds = time.perf_counter() - start
    start = time.perf_counter()
    figures.update(trained(host, default_refine))
    figures.update({"stand_in_seconds": round(stand_in_seconds, 1),
                    "trained_seconds": round(time.perf_counter() - start, 1)})
    report(figures, args.json)


if __name__ == "__main__":
    main()
