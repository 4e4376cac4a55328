"""Do the directions mean anything? Measured in the faces world (world/): a diffusion model trained
on cartoon faces drawn from seven known factors, and a regressor that reads the factors back.

Every direction is swept over the same alphas on the same seeds; alpha is the shift in units of
the site's RMS token norm, so every direction perturbs by the same norm. Methods: attention
eigendirections (whitened, value, qkv-stack) at every self-attention layer, sampled with ddim;
h-space principal directions (one set, of the middle block's output averaged over positions,
across samples with each timestep centred on its own mean), sampled with the pack's Asyrp Sampler,
which h-space edits need; and, as the baseline of each family, random unit directions at the same
sites, as many, with the same sampler. Per direction:

- effect: the largest |slope| of one factor against alpha (factor units, each factor spans 0 to 1);
- purity: that factor's share of the summed |slope| over all seven factors;
- preservation: PSNR (dB, the mean over images) of the edited image against the alpha = 0 image,
  outside the pixels the changed factor owns (the face drawn by the generator with and without
  the change);
- effect_on_inverted (best direction of each method): the same effect on held-out images of the
  world inverted with DDIM Invert and sampled back edited;
- per method, the largest and the median effect over those of the random directions at its sites.
Once: inversion_psnr, the PSNR of invert -> reconstruct on those held-out images, and
inversion_factor_error, how far the factors read from the reconstructions are from the originals'
(mean absolute, factor units). Writes
benchmarks/semantics.jpg, the best directions' sweeps. All on the host's real nodes.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from benchmarks.common import arguments, report, start_host
from world.faces import FACTORS, SIZE as IMAGE_SIZE, dataset, render
from world.regressor import load as load_regressor, to_input

SEEDS, BASE_SEED, STEPS = 16, 1000, 20
ALPHAS = (-2.0, -1.0, 1.0, 2.0)
PER_SITE, HSPACE_COUNT, HSPACE_SAMPLES = 4, 8, 64
HELD_OUT_SEED, HELD_OUT_IMAGES = 303, 8  # neither the model's nor the regressor's images
PICTURE = Path(__file__).resolve().parent / "semantics.jpg"
BASELINE = {"whitened": "random-attention", "value": "random-attention", "qkv-stack": "random-attention",
            "hspace-pca": "random-hspace"}


class World:
    """The trained model on the host, its conditioning and identity VAE, and the regressor."""

    def __init__(self, host):
        import comfy.sample
        import comfy.samplers
        self.sample_module, self.samplers = comfy.sample, comfy.samplers
        self.registry = host.nodes.NODE_CLASS_MAPPINGS
        self.model, self.vae, self.conditioning = self.registry["FacesWorldLoader"]().load()
        self.regressor = load_regressor()
        self.ddim = comfy.samplers.sampler_object("ddim")
        self.asyrp = self.registry["AsyrpSampler"]().get_sampler(0.0, 1.0)[0]

    def sample(self, model, start: torch.Tensor, sampler=None, batch_index=None, add_noise=True,
               seed=BASE_SEED) -> torch.Tensor:
        """``STEPS`` steps of ddim (or ``sampler``) at cfg 1, the model being unconditional, as KSampler and
        SamplerCustom run them -> images [B, 32, 32, 3] in [0, 1]. ``batch_index`` gives image i the
        noise of seed index i; ``add_noise`` False starts from ``start`` itself (an inverted latent)."""
        noise = self.sample_module.prepare_noise(start, seed, batch_index) if add_noise else torch.zeros_like(start)
        sigmas = self.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
        samples = self.sample_module.sample_custom(model, noise, 1.0, sampler or self.ddim, sigmas, self.conditioning,
                                                   self.conditioning, start, seed=seed)
        return self.vae.decode(samples).float()

    def sweep(self, model, alphas, sampler=None) -> torch.Tensor:
        """Every seed at every alpha, in one sampler call -> [SEEDS, len(alphas), 32, 32, 3]."""
        start = torch.zeros(SEEDS * len(alphas), 3, IMAGE_SIZE, IMAGE_SIZE)
        images = self.sample(model, start, sampler, batch_index=[seed for seed in range(SEEDS) for _ in alphas])
        return images.reshape(SEEDS, len(alphas), IMAGE_SIZE, IMAGE_SIZE, 3)

    def edited(self, dset, index, site, alphas, batch: int):
        """The model with one direction applied: ``alphas`` in turn along a latent batch of ``batch`` images."""
        alpha_list = ", ".join(str(alphas[i % len(alphas)]) for i in range(batch))
        return self.registry["ApplyDirection"]().apply(self.model, dset, index, site, 0.0, 0.0, 1.0, "both",
                                                       alpha_list=alpha_list)[0]

    @torch.no_grad()
    def factors(self, images: torch.Tensor) -> torch.Tensor:
        """[..., 32, 32, 3] in [0, 1] -> [..., 7], as the regressor reads them from the saved 8-bit images."""
        pixels = (images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3) * 255).round().to(torch.uint8).numpy()
        return self.regressor(to_input(pixels)).reshape(*images.shape[:-3], len(FACTORS))


def slopes(base: torch.Tensor, swept: torch.Tensor, alphas) -> torch.Tensor:
    """Least-squares slope of each factor's change against alpha: base [S, 7], swept [S, A, 7] -> [7]."""
    a = torch.tensor(alphas)[None, :, None]
    return ((swept - base[:, None]) * a).sum((0, 1)) / (a.square().sum() * base.shape[0])


def psnr(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """PSNR (dB, images in [0, 1]) over the pixels where ``keep`` [.., H, W] is true."""
    error = (a - b).square().mean(-1)
    mse = float(error.mean() if keep is None else error[keep].mean())
    return 10 * np.log10(1 / max(mse, 1e-10))


def owned_pixels(factors: np.ndarray, factor: int, change: float) -> torch.Tensor:
    """The pixels a factor change owns: where the generator's drawing differs, grown by a pixel."""
    moved = factors.copy()
    moved[factor] = np.clip(moved[factor] + change, 0, 1)
    difference = np.abs(render(factors).astype(int) - render(moved).astype(int)).sum(-1) > 30
    grown = F.max_pool2d(torch.from_numpy(difference).float()[None, None], 3, stride=1, padding=1)
    return grown[0, 0] > 0


def measure(world, base_images, base_factors, images, alphas) -> dict:
    swept = world.factors(images)
    slope = slopes(base_factors, swept, alphas)
    factor = int(slope.abs().argmax())
    keep = [~owned_pixels(base_factors[s].numpy(), factor, float(slope[factor]) * alpha)
            for s in range(SEEDS) for alpha in alphas]
    outside = [psnr(images[s, i], base_images[s, 0], keep[s * len(alphas) + i])
               for s in range(SEEDS) for i in range(len(alphas)) if keep[s * len(alphas) + i].any()]
    return {"factor": FACTORS[factor], "effect": round(float(slope[factor].abs()), 4),
            "purity": round(float(slope[factor].abs() / slope.abs().sum()), 3),
            "preservation_db": round(float(np.mean(outside)), 2) if outside else None,
            "slope": round(float(slope[factor]), 4)}


def random_set(dset_module, model_entry: dict, widths: dict, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    sites = {site: dset_module.SiteDirections(F.normalize(torch.randn(count, width, generator=generator), dim=1))
             for site, width in widths.items()}
    return dset_module.DirectionSet(sites=sites, method="random", model=model_entry)


def hspace_set(world, dset_module, hspace_module, model_entry: dict):
    """Principal directions of h (the middle block's output, averaged over positions) across samples
    other than the measured ones."""
    collected = []
    hook = world.model.model.diffusion_model.middle_block[-1].register_forward_hook(  # the host calls the layers
        lambda module, inputs, output: collected.append(output.float().mean((2, 3)).cpu()))
    try:
        world.sample(world.model, torch.zeros(HSPACE_SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE), seed=BASE_SEED + 1)
    finally:
        hook.remove()
    if len(collected) != STEPS:
        raise RuntimeError(f"h-space: expected one UNet call of the whole batch per step, got {len(collected)} "
                           f"calls for {STEPS} steps; lower HSPACE_SAMPLES so the host does not split the batch")
    vectors, spread = hspace_module.principal_directions(torch.stack(collected), HSPACE_COUNT)
    return dset_module.DirectionSet(sites={"h_space": dset_module.SiteDirections(vectors, spread)},
                                    method="hspace-pca", model=model_entry)


def inverted(world):
    """Held-out world images inverted with the pack's DDIM Invert: (originals [N, 32, 32, 3], its x_T LATENT)."""
    pixels, _ = dataset(HELD_OUT_IMAGES, HELD_OUT_SEED, IMAGE_SIZE)
    originals = torch.from_numpy(pixels).float() / 255
    latent = {"samples": world.vae.encode(originals)}
    inverted_latent = world.registry["DDIMInvert"]().invert(world.model, latent, STEPS, "normal", 1.0, 2,
                                                            world.conditioning)[0]
    return originals, inverted_latent


def sample_back(world, model, inverted_latent, alphas, sampler=None) -> torch.Tensor:
    """Each inverted image at each alpha -> [N, A, 32, 32, 3] (add_noise off, as after inversion)."""
    count = inverted_latent["samples"].shape[0]
    start = inverted_latent["samples"].repeat_interleave(len(alphas), 0)
    images = world.sample(model, start, sampler, add_noise=False)
    return images.reshape(count, len(alphas), IMAGE_SIZE, IMAGE_SIZE, 3)


def picture(rows: list, path: Path, scale: int = 3, seeds=(0, 1, 2), gap: int = 8):
    """One row per direction: its sweep for a few seeds, alphas in order (0 the unedited image), labelled."""
    tile, label_width, header = IMAGE_SIZE * scale, 240, 22
    order = sorted([*ALPHAS, 0.0])

    def left(j, i):  # seed j's alpha i
        return label_width + j * (len(order) * tile + gap) + i * tile
    canvas = Image.new("RGB", (left(len(seeds), 0) - gap, header + len(rows) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for j in range(len(seeds)):
        for i, alpha in enumerate(order):
            draw.text((left(j, i) + tile // 3, 5), f"{alpha:+g}", fill="black")
    for r, (label, base, images) in enumerate(rows):
        draw.text((6, header + r * tile + tile // 2 - 14), label, fill="black")
        for j, seed in enumerate(seeds):
            by_alpha = {**dict(zip(ALPHAS, images[seed])), 0.0: base[seed, 0]}
            for i, alpha in enumerate(order):
                pixels = (by_alpha[alpha].numpy() * 255).round().astype(np.uint8)
                shown = Image.fromarray(pixels).resize((tile, tile), Image.NEAREST)
                canvas.paste(shown, (left(j, i), header + r * tile))
    canvas.save(path, quality=90)


def sampler_of(world, method: str):
    """h-space edits need Asyrp's asymmetric step (a plain step shifts both of its halves, which cancels)."""
    return world.asyrp if "hspace" in method else world.ddim


def summary(records: list, baseline: list | None) -> dict:
    """A method's figures; against ``baseline`` (random directions at the same sites), the ratios."""
    effects = [r["effect"] for r in records]
    figures = {"directions": len(records), "effect_max": max(effects),
               "effect_median": round(float(np.median(effects)), 4),
               "purity_median": round(float(np.median([r["purity"] for r in records])), 3),
               "best": sorted(records, key=lambda r: -r["effect"])[:3]}
    if baseline:
        random_effects = [r["effect"] for r in baseline]
        figures["effect_max_over_random"] = round(max(effects) / max(random_effects), 2)
        figures["effect_median_over_random"] = round(float(np.median(effects) / np.median(random_effects)), 2)
    return figures


def main():
    args = arguments(__doc__)
    host = start_host(args.device)
    world = World(host)
    from semantic_directions.directions import directionset as dset_module, hspace
    from semantic_directions.nodes.host import made_for
    model_entry = made_for(world.model)
    base_images = world.sweep(world.model, [0.0])
    base_factors = world.factors(base_images)[:, 0]

    discover = world.registry["DiscoverAttentionEigendirections"]()
    sets = {method: discover.discover(world.model, "all", PER_SITE, method, 1.0)[0]
            for method in ("whitened", "value", "qkv-stack")}
    attention_widths = {site: s.width for site, s in sets["whitened"].sites.items()}
    sets["hspace-pca"] = hspace_set(world, dset_module, hspace, model_entry)
    sets["random-attention"] = random_set(dset_module, model_entry, attention_widths, PER_SITE, seed=1)
    sets["random-hspace"] = random_set(dset_module, model_entry, {"h_space": sets["hspace-pca"].sites["h_space"].width},
                                       HSPACE_COUNT, seed=2)
    records, images_of = {}, {}
    for method, dset in sets.items():
        records[method] = []
        for site, directions in dset.sites.items():
            for index in range(directions.count):
                model = world.edited(dset, index, site, ALPHAS, SEEDS * len(ALPHAS))
                images = world.sweep(model, ALPHAS, sampler_of(world, method))
                record = {"site": site, "index": index, **measure(world, base_images, base_factors, images, ALPHAS)}
                records[method].append(record)
                images_of[(method, site, index)] = images
                if not args.json:
                    print(method, record, flush=True)

    originals, inverted_latent = inverted(world)
    reconstructed = sample_back(world, world.model, inverted_latent, [0.0])
    original_factors = world.factors(originals)
    methods = {}
    for method in sets:
        methods[method] = summary(records[method], records.get(BASELINE.get(method)))
        best = methods[method]["best"][0]
        model = world.edited(sets[method], best["index"], best["site"], ALPHAS, HELD_OUT_IMAGES * len(ALPHAS))
        edited = sample_back(world, model, inverted_latent, ALPHAS, sampler_of(world, method))
        effect = slopes(world.factors(reconstructed)[:, 0], world.factors(edited), ALPHAS)
        best["effect_on_inverted"] = round(float(effect[FACTORS.index(best["factor"])].abs()), 4)

    rows = []
    for method, figures in methods.items():
        for best in figures["best"][:2]:
            label = (f"{method}\n{best['site'].replace('.transformer_blocks.0.attn1', '')} #{best['index']}\n"
                     f"{best['factor']} {best['slope']:+.3f}/alpha, purity {best['purity']:.2f}")
            rows.append((label, base_images, images_of[(method, best["site"], best["index"])]))
    picture(rows, PICTURE)
    report({
        "device": args.device, "seeds": SEEDS, "steps": STEPS, "alphas": list(ALPHAS),
        "regressor_factors": list(FACTORS),
        "inversion_psnr": round(psnr(reconstructed[:, 0], originals), 2),
        "inversion_factor_error": round(float((world.factors(reconstructed)[:, 0] - original_factors).abs().mean()), 4),
        "methods": methods, "picture": str(PICTURE),
    }, args.json)


if __name__ == "__main__":
    main()
