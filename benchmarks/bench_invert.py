"""DDIM inversion round trips on two models, in one run: the Gaussian-prior stand-in and the faces world's model.

Each round trip inverts with the pack's DDIM Invert (normal scheduler, cfg 1, the model's
conditioning) and samples back as KSamplerAdvanced does with add_noise disabled (ddim, the same
steps and scheduler, cfg 1); the error is the relative error in latent space,
|sampled back - original| / |original| over the whole batch, for refine 0, 1, 2 and 3.

1. The stand-in: a UNet of SD1.5's block structure at the tests' small widths (--full-size: SD1.5's
   own widths, 860 M parameters, far too slow for 2 CPU cores) at a 16 x 16 latent, 50 steps.
   Random weights alone are no denoiser (their prediction ignores the input), so the UNet is
   wrapped as the tests do (GaussianPriorDenoiser): the exact denoiser of Gaussian data plus 0.05
   of the real UNet's correction. Its latent is Gaussian, the data that denoiser is exact for.
   Also reports the UNet evaluations of one inversion at the default refine, and the time of an
   inversion over the time of sampling back with the same steps, measured side by side.
2. The trained faces world model (FacesWorldLoader: world/model.py, its empty conditioning and its
   identity pixel VAE, so the latent is the image in [-1, 1]): 8 held-out generator faces (seed
   world.regressor.HELD_OUT_SEED, not the model's training seed) at 20 and 50 steps, the error
   reduction of refine 2 over plain inversion (1 - error(refine 2) / error(refine 0)), and the
   model evaluations per step and image for each refine value, counted at the UNet.
"""
import sys
import time

import torch

from benchmarks.common import arguments, report, start_host

STEPS, LATENT = 50, 16
REFINES = (0, 1, 2, 3)
TRAINED_STEPS, TRAINED_IMAGES = (20, 50), 8


class RoundTrip:
    """DDIM Invert and the add_noise-disabled ddim sampling back, on one model, counting UNet rows."""

    def __init__(self, host, model, conditioning):
        self.host, self.model, self.conditioning = host, model, conditioning
        self.invert_node = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()
        self.rows = []

    def invert(self, latent, steps, refine):
        """(the inverted LATENT, UNet rows it evaluated, seconds)."""
        self.rows.clear()
        hook = self.model.model.diffusion_model.register_forward_hook(
            lambda m, i, o: self.rows.append(i[0].shape[0]))
        try:
            start = time.perf_counter()
            inverted = self.invert_node.invert(self.model, latent, steps, "normal", 1.0, refine,
                                               positive=self.conditioning)[0]
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        return inverted, sum(self.rows), seconds

    def sample_back(self, inverted, steps):
        """(samples, seconds): KSamplerAdvanced's path with add_noise disabled, ddim, cfg 1."""
        start = time.perf_counter()
        samples = self.host.nodes.common_ksampler(self.model, 0, steps, 1.0, "ddim", "normal", self.conditioning,
                                                  self.conditioning, inverted, disable_noise=True, start_step=0,
                                                  last_step=steps, force_full_denoise=True)[0]["samples"]
        return samples, time.perf_counter() - start

    def measure(self, latent, steps):
        """Per refine value: relative round-trip error, UNet rows of the inversion, invert and sample seconds."""
        results = {}
        for refine in REFINES:
            inverted, rows, invert_seconds = self.invert(latent, steps, refine)
            back, sample_seconds = self.sample_back(inverted, steps)
            original = latent["samples"]
            error = float((back.to(original) - original).norm() / original.norm())
            results[refine] = {"error": error, "rows": rows, "invert_s": invert_seconds, "sample_s": sample_seconds}
        return results


def stand_in(host, default_refine, full_size):
    from harness.test_nodes.unets import build_unet, with_gaussian_prior
    model = with_gaussian_prior(build_unet("sd15", full_size=full_size))
    context = 768 if full_size else 32
    conditioning = [[torch.randn(1, 77, context, generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)) / 0.18215}
    round_trip = RoundTrip(host, model, conditioning)
    round_trip.invert(latent, 1, 0)  # the host's first sampling loads the model: keep it out of the timings
    results = round_trip.measure(latent, STEPS)
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


def trained(host):
    from world.faces import SIZE, dataset
    from world.regressor import HELD_OUT_SEED
    model, vae, conditioning = host.nodes.NODE_CLASS_MAPPINGS["FacesWorldLoader"]().load()
    pixels, _ = dataset(TRAINED_IMAGES, HELD_OUT_SEED, SIZE)
    latent = {"samples": vae.encode(torch.from_numpy(pixels).float() / 255)}  # the identity VAE: [-1, 1] pixels
    round_trip = RoundTrip(host, model, conditioning)
    figures = {"trained_model": "faces world (FacesWorldLoader)", "trained_images": TRAINED_IMAGES,
               "trained_held_out_seed": HELD_OUT_SEED, "trained_latent": list(latent["samples"].shape)}
    evaluations = {}
    for steps in TRAINED_STEPS:
        results = round_trip.measure(latent, steps)
        errors = [results[refine]["error"] for refine in REFINES]
        figures[f"trained_error_by_refine_{steps}"] = [round(e, 6) for e in errors]
        figures[f"trained_error_reduction_{steps}"] = round(1 - errors[2] / errors[0], 4)
        for refine in REFINES:
            per_step = results[refine]["rows"] / (steps * TRAINED_IMAGES)
            evaluations.setdefault(refine, set()).add(int(per_step) if per_step.is_integer() else per_step)
    if any(len(counts) != 1 for counts in evaluations.values()):
        raise RuntimeError(f"model evaluations per step differ between step counts: {evaluations}")
    figures["trained_model_evaluations_per_step"] = {refine: counts.pop() for refine, counts in evaluations.items()}
    return figures


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
    figures.update(trained(host))
    figures.update({"stand_in_seconds": round(stand_in_seconds, 1),
                    "trained_seconds": round(time.perf_counter() - start, 1)})
    report(figures, args.json)


if __name__ == "__main__":
    main()
