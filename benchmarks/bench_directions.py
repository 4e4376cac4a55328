"""Cost of the directions-from-images methods, through the nodes, on an SD1.5-sized UNet (real widths,
random weights) at a 64 x 64 latent (512 px), with the settings of the example workflows: a batch of
BATCH images, STEPS ddim steps at cfg CFG (two model rows per image and step), h-space.

- ``pca``: Directions From Samples (one sampling of the batch);
- ``pair``: Direction From Prompt Pair (two samplings of the batch, one per prompt);
- ``jacobian``: Directions From Image (Jacobian) for one image at h-space, its defaults (cfg 1, 1280
  channels, count 8): blocks of 14 forward-mode and 14 reverse-mode model rows until the Krylov iteration
  stops (forming J would take 1280 forward-mode rows).

Each reports its seconds and its model evaluations (UNet rows: one model call for one image, counted
at the UNet), beside one plain sampling of the same batch timed in the same run, so the ratio says
what recording costs on top of sampling.

--quick (minutes on a CPU, where the above takes hours): only Directions From Image at h-space, its defaults,
on one image at a QUICK_LATENT x QUICK_LATENT latent, against forming the Jacobian: the node's seconds and its
forward- and reverse-mode rows, and what forming J would take (one forward-mode row per channel), its seconds
estimated from FORWARD_CHUNK such rows timed in the same run (jacobian_formed_s_estimate).
"""
import time

import torch

from benchmarks.common import UNetRows, arguments, report, start_host, unet_precision

BATCH, STEPS, CFG, LATENT, QUICK_LATENT = 8, 20, 7.0, 64, 8


def jacobian_against_formed(model, registry, prompt, size: int) -> dict:
    """Directions From Image's defaults at h-space on one image, beside the cost of forming its Jacobian."""
    from semantic_directions.nodes.jacobian import FORWARD_CHUNK, RowProgress, site_widths, with_jacobian
    image = {"samples": torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))}
    with UNetRows(model) as counter:
        start = time.perf_counter()
        registry["DirectionsFromImage"]().directions(model, prompt, prompt, image, 0, 0.3, 1.0, "h_space", 8)
        seconds = time.perf_counter() - start
    width, timed_rows = site_widths(model, ["h_space"])["h_space"], {}

    def forward_rows(apply, apply_t, width):
        start = time.perf_counter()
        apply(torch.eye(width)[:, :FORWARD_CHUNK])
        timed_rows["s"] = time.perf_counter() - start
    sigmas = torch.tensor([float(model.get_model_object("model_sampling").percent_to_sigma(0.3)), 0.0])
    run = with_jacobian(model, prompt, prompt, image["samples"], 0, sigmas, 1.0, "h_space", width, forward_rows,
                        RowProgress(FORWARD_CHUNK))
    return {"jacobian_latent": list(image["samples"].shape), "jacobian_s": round(seconds, 2),
            "jacobian_model_evaluations": counter.rows, "jacobian_formed_model_evaluations": width,
            "jacobian_formed_s_estimate": round(timed_rows["s"] * width / run.model_rows["forward"], 1)}


def main():
    args = arguments(__doc__, quick="only Directions From Image against forming its Jacobian, at an 8 x 8 latent")
    host = start_host(args.device)
    import comfy.sample

    from harness.test_nodes.unets import build_unet
    registry = host.nodes.NODE_CLASS_MAPPINGS
    model = build_unet("sd15", full_size=True, **unet_precision(args.device))
    unet = f"sd15 full size, random weights, {model.model.get_dtype()}"
    generator = torch.Generator().manual_seed(0)
    prompts = [[[torch.randn(1, 77, 768, generator=generator), {}]] for _ in range(3)]
    if args.quick:
        report({"device": args.device, "threads": torch.get_num_threads(), "unet": unet,
                "site": "h_space", "count": 8, **jacobian_against_formed(model, registry, prompts[0], QUICK_LATENT)},
               args.json)
        return
    latent = {"samples": torch.zeros(BATCH, 4, LATENT, LATENT)}
    sampling = (0, "enable", STEPS, CFG, "ddim", "normal")

    def plain():
        noise = comfy.sample.prepare_noise(latent["samples"], 0)
        comfy.sample.sample(model, noise, STEPS, CFG, "ddim", "normal", prompts[0], prompts[2], latent["samples"],
                            seed=0, disable_pbar=True)

    def pca():
        registry["DirectionsFromSamples"]().directions(model, prompts[0], prompts[2], latent, *sampling, "h_space",
                                                       0.0, 1.0, 8)

    def pair():
        registry["DirectionFromPromptPair"]().direction(model, prompts[0], prompts[1], prompts[2], latent, *sampling,
                                                        "h_space", 0.0, 1.0, "source", "target")
    def jacobian():
        registry["DirectionsFromImage"]().directions(model, prompts[0], prompts[2], {"samples": latent["samples"][:1]},
                                                      0, 0.3, 1.0, "h_space", 8)

    figures = {"device": args.device, "threads": torch.get_num_threads(), "unet": unet,
               "latent": [BATCH, 4, LATENT, LATENT], "steps": STEPS, "cfg": CFG, "site": "h_space"}
    with torch.no_grad():
        for name, run in (("sampling", plain), ("pca", pca), ("pair", pair), ("jacobian", jacobian)):
            with UNetRows(model) as counter:
                start = time.perf_counter()
                run()
                figures[f"{name}_s"] = round(time.perf_counter() - start, 2)
            figures[f"{name}_model_evaluations"] = counter.rows
    for name in ("pca", "pair"):
        figures[f"{name}_over_sampling_time"] = round(figures[f"{name}_s"] / figures["sampling_s"], 3)
    report(figures, args.json)


if __name__ == "__main__":
    main()
