"""DDIM inversion round trip on an SD1.5-sized UNet at a small latent, 50 steps, on one machine run.

Random weights alone are no denoiser (their prediction ignores the input), so the UNet is wrapped
as the tests do (GaussianPriorDenoiser): the exact denoiser of Gaussian data plus 0.05 of the real
UNet's correction, which behaves like a trained model where inversion is concerned. Reports the
round-trip relative error in latent space for plain DDIM inversion and for each refine value
(the default is chosen from these figures), the UNet evaluations of one inversion, and the time of
an inversion over the time of sampling back with the same steps, measured side by side.
"""
import time

import torch

from benchmarks.common import arguments, report, start_host

STEPS, LATENT = 50, 16


def main():
    args = arguments(__doc__)
    host = start_host(args.device)
    from harness.test_nodes.unets import build_unet, with_gaussian_prior
    invert_node = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()
    default_refine = invert_node.INPUT_TYPES()["required"]["refine"][1]["default"]
    model = with_gaussian_prior(build_unet("sd15", full_size=True))
    conditioning = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)) / 0.18215}
    rows = []
    hook = model.model.diffusion_model.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))

    def invert(refine):
        return invert_node.invert(model, latent, STEPS, "normal", 1.0, refine, positive=conditioning)[0]

    def sample_back(inverted):
        return host.nodes.common_ksampler(model, 0, STEPS, 1.0, "ddim", "normal", conditioning, conditioning,
                                          inverted, disable_noise=True, start_step=0, last_step=STEPS,
                                          force_full_denoise=True)[0]["samples"]

    errors, timings = {}, {}
    for refine in (0, 1, 2, 3):
        rows.clear()
        start = time.perf_counter()
        inverted = invert(refine)
        timings[refine] = time.perf_counter() - start
        evaluations = sum(rows)
        start = time.perf_counter()
        back = sample_back(inverted)
        timings[f"sample_{refine}"] = time.perf_counter() - start
        errors[refine] = float((back - latent["samples"]).norm() / latent["samples"].norm())
        if refine == default_refine:
            unet_calls = evaluations
    hook.remove()
    sample_time = min(v for k, v in timings.items() if str(k).startswith("sample_"))
    report({
        "device": args.device, "threads": torch.get_num_threads(), "steps": STEPS,
        "latent": [1, 4, LATENT, LATENT], "default_refine": default_refine,
        "recon_rel_error_plain": round(errors[0], 6),
        "recon_rel_error_refined": round(errors[default_refine], 8),
        "recon_rel_error_by_refine": {k: round(v, 8) for k, v in errors.items()},
        "unet_calls": unet_calls,
        "invert_over_sample_time": round(timings[default_refine] / sample_time, 3),
        "invert_over_sample_time_by_refine": {k: round(timings[k] / sample_time, 3) for k in errors},
    }, args.json)


if __name__ == "__main__":
    main()
