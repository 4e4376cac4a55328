"""Do the directions mean anything? Measured in the faces world (world/): a diffusion model trained
on cartoon faces drawn from seven known factors, and a regressor that reads the factors back.

Every direction is swept on the same seeds over alphas inside the linear regime (LINEAR_ALPHAS, finer
for h-space; alpha is the shift in units of the site's RMS token norm, so every direction perturbs by the same
norm), through the host's real nodes: attention eigendirections (whitened, value, qkv-stack) at
every self-attention site, sampled with ddim; h-space principal directions (the pack's Directions From
Samples node), sampled with the pack's Asyrp Sampler (h-space edits need it); example-pair directions per
factor at every site (the pack's Direction From Example Pair on inverted held-out faces with the factor high
against low: ``pair`` from different faces, ``pair-matched`` from each face drawn with the factor low and high,
as photos of the same person with and without an attribute; full runs only; ``pair-conditional``, each
factor's ``pair`` direction with the other factors' projected out by the pack's Project Out Directions), with
each factor's best site reported against random and the ceiling (``pair_named``, ``pair_matched_named``,
``pair_conditional_named``);
Jacobian directions at every site (the pack's Directions From Image on one held-out face, ``jacobian``, and on
a batch of held-out faces together, the first of them that face, ``jacobian-faces``; their count in
``jacobian_faces``), each site's best over the whitened eigendirections' best (``jacobian_over_whitened``,
``jacobian_faces_over_whitened``; the sites where it is at least 1 in ``..._at_least_whitened_sites``), and,
in the regime they are for, each of several held-out faces' own Jacobian directions applied to that face
inverted, against whitened (h-space: principal) directions on the same face (``own_face_edits``); random unit
directions at the same sites, as many, with the same sampler; and the site's ceiling: supervised directions
from the gradient of each factor's reading through the whole sampling (``strongest``: the gradient; ``pure``: the
gradient with the other factors' gradients projected out), measured like every other direction. Per direction, all
seven factor slopes (least squares through alpha 0, per seed); its effect is the largest |slope|,
its purity that factor's share of the summed |slope|, its preservation the PSNR outside the pixels
the moved factor owns.

Per method: the best direction's effect over the best random direction's at the same site, the
median effect over the random median at the method's sites (both with bootstrap 95% intervals over
seeds), the best direction's purity and effect as fractions of its site's ceiling for its factor,
the transfer to inverted held-out faces (DDIM Invert, sampled back edited: the slope of the same
factor there over its slope on generated faces, all seven slopes reported), and the saturation
curve of its factor out to four times the largest linear alpha. Per site, the same for every method, and the ceiling
of each factor. The world model against its limit (world/quality.py): one-step x0 PSNR beside the oracle
denoiser's, and its samples' redraw PSNR and noise. Writes benchmarks/semantics.jpg, each method's
best direction swept out to four times the largest linear alpha.

    .venv/bin/python -m benchmarks.bench_semantics --json [--quick]

A full run keeps each sweep's result in .cache/bench-semantics (SweepCache), so one that stops continues
where it stopped when run again. --quick (development, under 5 minutes on 2 cores): one attention site and
h-space, 4 seeds, the two largest alphas per sign, example pairs for two factors, one Jacobian direction per
site from one face and one from a batch of two, one own face, one face for the oracle.
"""
import hashlib
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from benchmarks.common import REPO, arguments, report, start_host
from benchmarks.measures import bootstrap_interval, bootstrap_resamples, ceiling_directions, effect, purity, seed_slopes
from harness.cpu import idle_threads
from world import quality
from world.faces import FACTORS, dataset, render
from world.faces import SIZE as IMAGE_SIZE
from world.regressor import load as load_regressor
from world.regressor import to_input

STEPS, BASE_SEED = 20, 1000
# Linear regime per site family. Attention: the README's useful range. h-space responds far more per unit of
# its RMS norm: the central difference at +-0.05 is already 13% off the gradient there (third-order terms),
# at +-0.01 within 1% (tests/test_measures.py), so it is swept five times finer.
LINEAR_ALPHAS = {"attention": (-0.5, -0.25, -0.1, 0.1, 0.25, 0.5), "hspace": (-0.1, -0.05, -0.02, 0.02, 0.05, 0.1)}
# quick sweeps the two largest per sign: the slope through 0 weighs each alpha by its square, so the smallest carried 3%
QUICK_ALPHAS = {name: tuple(a for a in alphas if abs(a) >= max(alphas) / 2) for name, alphas in LINEAR_ALPHAS.items()}
SATURATION = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)  # multiples of the family's largest linear alpha, for the picture
HELD_OUT_SEED = 303  # neither the model's nor the regressor's images
FULL = {"seeds": 16, "per_site": 4, "jacobian": 4, "jacobian_faces": 8, "hspace": 8, "held_out": 16, "own_faces": 8,
        "oracle_faces": 16, "samples": 32, "sites": None, "pair_faces": 48, "pair_factors": FACTORS,
        "alphas": LINEAR_ALPHAS}
QUICK = {"seeds": 4, "per_site": 2, "jacobian": 1, "jacobian_faces": 2, "hspace": 2, "held_out": 4, "own_faces": 1,
         "oracle_faces": 1, "samples": 8, "pair_faces": 4, "pair_factors": ("smile", "background"),
         "alphas": QUICK_ALPHAS, "sites": ("output_blocks.1.1.transformer_blocks.0.attn1",)}
HSPACE_SAMPLES = 64
MODEL_BATCH = 48  # images a model call: fastest per image on 2 CPU cores (7.7 ms; 8.7 at 96, 10 at 16)
JACOBIAN_SEED = 505
PAIR_SEED, PAIR_POOL = 404, 400  # the example pairs' faces: the top and bottom of this many held-out faces per factor
PICTURE = Path(__file__).resolve().parent / "semantics.jpg"
QUICK_PICTURE = Path(__file__).resolve().parent.parent / ".cache" / "semantics-quick.jpg"  # not the README's
RANDOM = {"attention": "random-attention", "hspace": "random-hspace"}
SWEEP_CACHE = REPO / ".cache" / "bench-semantics"
# what a sweep runs: Apply Direction, the Asyrp Sampler, the host access, the world and its loader, the statistics
# what the direction sets come from besides SWEEP_SOURCES: the whole pack, this file (their recipes) and the world
SET_SOURCES = ("directions/*.py", "nodes/**/*.py", "benchmarks/bench_semantics.py", "benchmarks/common.py",
               "world/*.py")
SWEEP_SOURCES = ("directions/apply.py", "directions/asyrp.py", "directions/directionset.py", "nodes/apply.py",
                 "nodes/asyrp.py", "nodes/common.py", "nodes/host/*.py", "harness/**/*.py", "benchmarks/measures.py",
                 "world/faces.py", "world/model.py", "world/regressor.py", "world/*.safetensors")


def family(site: str) -> str:
    return "hspace" if site == "h_space" else "attention"


def linear_alphas(site: str, plan: dict) -> tuple:
    return plan["alphas"][family(site)]


def saturation_alphas(site: str, plan: dict) -> tuple:
    return tuple(m * max(linear_alphas(site, plan)) for m in SATURATION)


class World:
    """The trained model on the host, its conditioning and identity VAE, and the regressor."""

    def __init__(self, host, seeds: int):
        import comfy.sample
        import comfy.samplers
        self.sample_module, self.samplers = comfy.sample, comfy.samplers
        self.registry = host.nodes.NODE_CLASS_MAPPINGS
        self.model, self.vae, self.conditioning = self.registry["FacesWorldLoader"]().load()
        self.regressor = load_regressor()
        self.ddim = comfy.samplers.sampler_object("ddim")
        self.asyrp = self.registry["AsyrpSampler"]().get_sampler(0.0, 1.0)[0]
        self.seeds = seeds

    def sigmas(self) -> torch.Tensor:
        return self.samplers.calculate_sigmas(self.model.get_model_object("model_sampling"), "normal", STEPS)

    def sample(self, start: torch.Tensor, direction=None, alphas=None, sampler=None, batch_index=None,
               add_noise=True, seed=BASE_SEED) -> torch.Tensor:
        """``STEPS`` steps of ddim (or ``sampler``) at cfg 1, the model being unconditional, as KSampler and
        SamplerCustom run them -> images [B, 32, 32, 3] in [0, 1]. ``direction`` (dset, index, site) is applied
        with ``alphas``, one per image, by Apply Direction's alpha_list. Image i gets the noise of seed index
        ``batch_index[i]`` (default i); ``add_noise`` False starts from ``start`` itself (an inverted latent).
        In sampler calls of at most MODEL_BATCH model rows (the Asyrp Sampler doubles its batch)."""
        batch_index = list(range(len(start))) if batch_index is None else batch_index
        rows = MODEL_BATCH // (2 if sampler is self.asyrp else 1)
        images = []
        for first in range(0, len(start), rows):
            part = slice(first, first + rows)
            model = self.model if direction is None else self.edited(*direction, alphas[part])
            noise = (self.sample_module.prepare_noise(start[part], seed, batch_index[part]) if add_noise
                     else torch.zeros_like(start[part]))
            samples = self.sample_module.sample_custom(model, noise, 1.0, sampler or self.ddim, self.sigmas(),
                                                       self.conditioning, self.conditioning, start[part], seed=seed)
            images.append(self.vae.decode(samples).float())
        return torch.cat(images)

    def sweep(self, alphas, direction=None, sampler=None) -> torch.Tensor:
        """Every seed at every alpha (``direction`` as in ``sample``) -> [seeds, len(alphas), 32, 32, 3]."""
        start = torch.zeros(self.seeds * len(alphas), 3, IMAGE_SIZE, IMAGE_SIZE)
        images = self.sample(start, direction, list(alphas) * self.seeds, sampler,
                             batch_index=[s for s in range(self.seeds) for _ in alphas])
        return images.reshape(self.seeds, len(alphas), IMAGE_SIZE, IMAGE_SIZE, 3)

    def edited(self, dset, index, site, alphas):
        """The model with one direction applied, ``alphas`` one per image of the latent batch."""
        return self.registry["ApplyDirection"]().apply(self.model, dset, index, site, 0.0, 0.0, 1.0, "both",
                                                       alpha_list=", ".join(map(str, alphas)))[0]

    @torch.no_grad()
    def factors(self, images: torch.Tensor) -> np.ndarray:
        """[..., 32, 32, 3] in [0, 1] -> [..., 7], as the regressor reads them from the saved 8-bit images."""
        pixels = (images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3) * 255).round().to(torch.uint8).numpy()
        return self.regressor(to_input(pixels)).reshape(*images.shape[:-3], len(FACTORS)).double().numpy()

    def factor_gradients(self, site: str) -> np.ndarray:
        """[7, width]: each factor's reading (mean over the seeds) differentiated with respect to a shift
        added at ``site`` as Apply Direction adds it (the site's RMS token norm times a vector, every
        step, every token), through the whole sampling: ddim, or for h-space Asyrp's step, which takes
        x0 from the edited prediction and the direction from the unedited one."""
        from semantic_directions.directions.apply import rms_token_norm
        from semantic_directions.directions.asyrp import asyrp_step
        unet = self.model.model.diffusion_model
        hspace = site == "h_space"
        module = unet.middle_block[-1] if hspace else unet.get_submodule(site)
        width = module.out_channels if hspace else module.to_q.in_features
        shift = torch.zeros(width, requires_grad=True)
        active = [False]

        def shifted_tokens(tokens):
            return tokens + rms_token_norm(tokens)[:, None, None] * shift if active[0] else tokens

        if hspace:
            handle = module.register_forward_hook(lambda m, args, out: shifted_tokens(
                out.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(out.shape))
        else:
            handle = module.register_forward_pre_hook(lambda m, args: (shifted_tokens(args[0]), *args[1:]))
        try:
            sampling = self.model.get_model_object("model_sampling")
            sigmas = self.sigmas()
            start = torch.zeros(self.seeds, 3, IMAGE_SIZE, IMAGE_SIZE)
            noise = self.sample_module.prepare_noise(start, BASE_SEED, list(range(self.seeds)))
            x = sampling.noise_scaling(sigmas[0], noise, start, max_denoise=True)
            context = self.conditioning[0][0].expand(self.seeds, -1, -1)

            def denoise(x, sigma, edited):
                active[0] = edited
                return self.model.model.apply_model(x, sigma.expand(len(x)), c_crossattn=context)
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
                x0 = denoise(x, sigma, True)
                original = denoise(x, sigma, False) if hspace else x0
                x = asyrp_step(x, sigma, sigma_next, x0, original)
            readings = self.regressor(x.clamp(-1, 1)).mean(0)
            return np.stack([torch.autograd.grad(readings[f], shift, retain_graph=f < len(FACTORS) - 1)[0].numpy()
                             for f in range(len(FACTORS))]).astype(np.float64)
        finally:
            handle.remove()


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


def preservation(base_images, base_factors, images, slope, alphas) -> float | None:
    """Mean PSNR of the edited images against the unedited ones outside the pixels the moved factor owns."""
    factor = int(np.abs(slope).argmax())
    values = []
    for s in range(images.shape[0]):
        for i, alpha in enumerate(alphas):
            keep = ~owned_pixels(base_factors[s], factor, float(slope[factor]) * alpha)
            if keep.any():
                values.append(psnr(images[s, i], base_images[s, 0], keep))
    return round(float(np.mean(values)), 2) if values else None


def unit_set(dset_module, model_entry: dict, vectors_by_site: dict, method: str):
    sites = {site: dset_module.SiteDirections(F.normalize(torch.as_tensor(v, dtype=torch.float32), dim=1))
             for site, v in vectors_by_site.items()}
    return dset_module.DirectionSet(sites=sites, method=method, model=model_entry)


def random_set(dset_module, model_entry: dict, widths: dict, count: int, seed: int, method: str):
    generator = torch.Generator().manual_seed(seed)
    return unit_set(dset_module, model_entry, {site: torch.randn(count, width, generator=generator)
                                               for site, width in widths.items()}, method)


def hspace_set(world, count: int):
    """Principal directions of h-space across samples other than the measured ones, by the pack's Directions
    From Samples node (the middle block's output averaged over positions, every step)."""
    node = world.registry["DirectionsFromSamples"]()
    latent = {"samples": torch.zeros(HSPACE_SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE)}
    return node.directions(world.model, world.conditioning, world.conditioning, latent, BASE_SEED + 1, "enable",
                           STEPS, 1.0, "ddim", "normal", "h_space", 0.0, 1.0, count)[0]


def jacobian_set(world, count: int, sites: str, face: torch.Tensor | None = None, faces: int = 1):
    """The pack's Directions From Image (Jacobian) at ``sites`` (the node's site input), for one face ([1, 32, 32,
    3] in [0, 1]; by default the held-out face JACOBIAN_SEED, or the first ``faces`` held-out faces of that seed
    as one batch) noised to 0.3 of the schedule (where structure edits start), ``count`` per site. The default
    faces' sets are measured on the generated seeds like the others, as directions of the model; own_face_edits
    measures each face's set on that face."""
    if face is None:
        pixels, _ = dataset(faces, JACOBIAN_SEED, IMAGE_SIZE)
        face = torch.from_numpy(pixels).float() / 255
    latent = {"samples": world.vae.encode(face)}
    return world.registry["DirectionsFromImage"]().directions(world.model, world.conditioning, world.conditioning,
                                                              latent, 0, 0.3, 1.0, sites, count)[0]


def pair_set(world, dset_module, model_entry: dict, faces: int, factors: tuple, log, matched: bool = False):
    """Per factor named in ``factors``, the pack's Direction From Example Pair at every site, from ``faces`` faces a
    side, inverted with DDIM Invert (all sides together) and sampled back as the node records them. Unmatched
    ("pair"): held-out faces with the factor in the top quarter against other faces with it in the bottom quarter,
    the other factors as they fall. Matched ("pair-matched", the same person with and without the attribute): each
    face drawn twice, the factor in the bottom and in the top quarter, every other factor the same. One unit
    direction per factor and site, in ``factors`` order (measured in site RMS units like every other direction)."""
    pool_pixels, pool_factors = dataset(PAIR_POOL, PAIR_SEED, IMAGE_SIZE)
    sides = []  # low, high per factor
    for name in factors:
        f = FACTORS.index(name)
        if matched:
            rng = np.random.default_rng(PAIR_SEED + f)
            for low, high in ((0.0, 0.25), (0.75, 1.0)):
                drawn = pool_factors[:faces].copy()
                drawn[:, f] = rng.uniform(low, high, faces)
                sides.append(np.stack([render(row, IMAGE_SIZE) for row in drawn]))
        else:
            order = np.argsort(pool_factors[:, f])
            sides += [pool_pixels[order[:faces]], pool_pixels[order[-faces:]]]
    latents = invert(world, np.concatenate(sides)).split(faces)
    pair, vectors = world.registry["DirectionFromExamplePair"](), {}
    for i, name in enumerate(factors):
        low, high = ({"samples": latent} for latent in latents[2 * i:2 * i + 2])
        found = pair.direction(world.model, world.conditioning, world.conditioning, low, high, 0, "disable", STEPS,
                               1.0, "ddim", "normal", "all", 0.0, 1.0, f"low {name}", f"high {name}")[0]
        for site, directions in found.sites.items():
            vectors.setdefault(site, []).append(directions.vectors[0])
        log(f"{'matched ' if matched else ''}pair directions for {name}: {len(found.sites)} sites")
    return unit_set(dset_module, model_entry, {s: torch.stack(v) for s, v in vectors.items()},
                    "pair-matched" if matched else "pair")


def conditional_set(world, dset_module, pairs):
    """Per factor of the example-pair set ``pairs``, its direction with the other factors' pair directions at the
    same site projected out, by the pack's Project Out Directions (InterFaceGAN's conditional directions)."""
    node, vectors = world.registry["ProjectOutDirections"](), {}

    def picked(indices):
        return dset_module.DirectionSet(sites={site: dset_module.SiteDirections(d.vectors[indices])
                                               for site, d in pairs.sites.items()}, method=pairs.method,
                                        model=pairs.model)
    count = pairs.count
    for i in range(count):
        found = node.project(picked([i]), picked([j for j in range(count) if j != i]))[0]
        for site, directions in found.sites.items():
            vectors.setdefault(site, []).append(directions.vectors[0])
    return unit_set(dset_module, pairs.model, {s: torch.stack(v) for s, v in vectors.items()}, "pair-conditional")


def invert(world, pixels: np.ndarray) -> torch.Tensor:
    """uint8 images [N, 32, 32, 3] -> their x_T [N, 3, 32, 32] by the pack's DDIM Invert (refine 2), MODEL_BATCH
    images a call (refinement stops on a call's worst residual, so which images share a call can move the last
    digits)."""
    node, images = world.registry["DDIMInvert"](), torch.from_numpy(pixels).float() / 255
    return torch.cat([node.invert(world.model, {"samples": world.vae.encode(images[i:i + MODEL_BATCH])}, STEPS,
                                  "normal", 1.0, 2, world.conditioning)[0]["samples"]
                      for i in range(0, len(images), MODEL_BATCH)])


def inverted(world, count: int):
    """Held-out world images inverted with the pack's DDIM Invert: (originals [N, 32, 32, 3], its x_T LATENT)."""
    pixels, _ = dataset(count, HELD_OUT_SEED, IMAGE_SIZE)
    return torch.from_numpy(pixels).float() / 255, {"samples": invert(world, pixels)}


def sample_back(world, inverted_latent, alphas, direction=None, sampler=None) -> torch.Tensor:
    """Each inverted image at each alpha -> [N, A, 32, 32, 3] (add_noise off, as after inversion)."""
    count = inverted_latent["samples"].shape[0]
    start = inverted_latent["samples"].repeat_interleave(len(alphas), 0)
    images = world.sample(start, direction, list(alphas) * count, sampler, add_noise=False)
    return images.reshape(count, len(alphas), IMAGE_SIZE, IMAGE_SIZE, 3)


def picture(rows: list, path: Path, scale: int = 3, seeds=(0, 1, 2), gap: int = 8):
    """One row per direction: its sweep for a few seeds at multiples of its family's largest linear alpha a
    (0 the unedited image), labelled."""
    tile, label_width, header = IMAGE_SIZE * scale, 250, 22
    order = sorted([*SATURATION, 0.0])
    seeds = [s for s in seeds if s < rows[0][1].shape[0]]

    def left(j, i):  # seed j's alpha i
        return label_width + j * (len(order) * tile + gap) + i * tile
    canvas = Image.new("RGB", (left(len(seeds), 0) - gap, header + len(rows) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for j in range(len(seeds)):
        for i, alpha in enumerate(order):
            draw.text((left(j, i) + tile // 4, 5), f"{alpha:+g} a" if alpha else "0", fill="black")
    for r, (label, base, images) in enumerate(rows):
        draw.text((6, header + r * tile + tile // 2 - 20), label, fill="black")
        for j, seed in enumerate(seeds):
            by_alpha = {**dict(zip(SATURATION, images[seed])), 0.0: base[seed, 0]}
            for i, alpha in enumerate(order):
                pixels = (by_alpha[alpha].numpy() * 255).round().astype(np.uint8)
                shown = Image.fromarray(pixels).resize((tile, tile), Image.NEAREST)
                canvas.paste(shown, (left(j, i), header + r * tile))
    canvas.save(path, quality=90)


def sampler_of(world, site: str):
    """h-space edits need Asyrp's asymmetric step (a plain step shifts both of its halves, which cancels)."""
    return world.asyrp if site == "h_space" else world.ddim


class Results:
    """Per-seed slopes [S, 7] of every measured direction, keyed (method, site, index), and the statistics
    over them; every statistic is a function of the mean slopes so the bootstrap can recompute it."""

    def __init__(self):
        self.per_seed, self.records = {}, {}

    def add(self, key, slopes_per_seed: np.ndarray, record: dict):
        self.per_seed[key], self.records[key] = slopes_per_seed, record

    def keys(self, method: str, site: str | None = None) -> list:
        return [k for k in self.per_seed if k[0] == method and (site is None or k[1] == site)]

    def means(self) -> dict:
        return {k: v.mean(0) for k, v in self.per_seed.items()}

    def best(self, method: str, means: dict, site: str | None = None):
        return max(self.keys(method, site), key=lambda k: effect(means[k]))

    def best_ratio(self, method: str, means: dict) -> float:
        """The method's best direction's effect over the best random direction's at the same site."""
        return self.site_ratio(method, self.best(method, means)[1], means)

    def median_ratio(self, method: str, means: dict) -> float:
        """The method's median effect over the random directions' median at the method's sites."""
        keys = self.keys(method)
        random = [k for site in {k[1] for k in keys} for k in self.keys(RANDOM[family(site)], site)]
        return float(np.median([effect(means[k]) for k in keys]) / np.median([effect(means[k]) for k in random]))

    def site_ratio(self, method: str, site: str, means: dict) -> float:
        """The method's best direction at ``site`` over the best random direction there."""
        random = self.keys(RANDOM[family(site)], site)
        return effect(means[self.best(method, means, site)]) / max(effect(means[k]) for k in random)

    def bootstrap(self, statistic, resamples) -> list:
        return bootstrap_interval(statistic, self.per_seed, resamples)


class SweepCache:
    """Each direction's measured slopes on disk (JSON), keyed by the shift Apply Direction adds, its site, the
    alphas and seeds, and what a sweep runs and on what: SWEEP_SOURCES (the weights among them), this file's
    sampling and measuring functions, MODEL_BATCH (batches change the last digits), the device and dtype the
    model runs in, the host's version and folder, torch's, numpy's and PIL's versions. A full run that stops
    continues where it stopped when run again; a change to any of these starts afresh. ``hits`` counts the
    sweeps read back. The slow direction sets (pair inversions, Jacobians, ceiling gradients) are kept too, as
    the pack's direction files, under a version that adds SET_SOURCES."""

    def __init__(self, world, folder: Path = SWEEP_CACHE):
        import PIL

        import comfy.sample
        host = Path(comfy.sample.__file__).resolve().parent.parent
        digest = hashlib.sha256(" ".join(map(str, (
            host, (host / "comfyui_version.py").read_text(), torch.__version__, np.__version__, PIL.__version__,
            MODEL_BATCH, world.model.load_device, world.model.model_dtype()))).encode())
        for path in sorted({path for pattern in SWEEP_SOURCES for path in REPO.glob(pattern)}):
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
        for function in (World, sampler_of, measure_direction, preservation, owned_pixels, psnr):
            digest.update(inspect.getsource(function).encode())
        self.version, self.folder, self.hits = digest.hexdigest(), folder, 0
        for path in sorted({path for pattern in SET_SOURCES for path in REPO.glob(pattern)}):
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
        self.sets_version, self.set_hits = digest.hexdigest(), 0

    def direction_set(self, name: str, make, *inputs):
        """``make()``'s direction set, read back when a run with the same sources made it from the same
        ``inputs`` (JSON: what the plan gave it)."""
        from semantic_directions.directions.fileformat import load_directions, save_directions
        key = f"{self.sets_version} {name} {json.dumps(inputs)}"
        path = self.folder / "sets" / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
        if path.exists():
            self.set_hits += 1
            return load_directions(path)
        dset = make()
        save_directions(dset, path, overwrite=True)
        return dset

    def path(self, dset, site: str, index: int, alphas, seeds: int) -> Path:
        from semantic_directions.nodes.apply import shift_unit
        digest = hashlib.sha256(f"{self.version} {site} {tuple(alphas)} {seeds} {STEPS} {BASE_SEED}".encode())
        digest.update(shift_unit(dset, site, index).detach().float().contiguous().cpu().numpy().tobytes())
        return self.folder / f"{digest.hexdigest()}.json"

    def read(self, path: Path):
        """(per-seed slopes, record) stored at ``path``, or None (absent, or cut short by a crash)."""
        try:
            saved = json.loads(path.read_text())
            found = np.asarray(saved["per_seed"], np.float64), saved["record"]
        except (OSError, ValueError, KeyError):
            return None
        self.hits += 1
        return found

    @staticmethod
    def write(path: Path, per_seed: np.ndarray, record: dict):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("w") as file:
            json.dump({"per_seed": per_seed.tolist(), "record": record}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)


def measure_direction(world, dset, site, index, base_images, base_factors, alphas, cache: SweepCache | None = None):
    """(per-seed slopes [S, 7], the direction's record) from one sweep through Apply Direction, or from
    ``cache`` where this sweep was measured before."""
    stored = cache.path(dset, site, index, alphas, world.seeds) if cache else None
    found = cache.read(stored) if stored is not None else None
    if found is not None:
        return found[0], {**found[1], "index": index}
    images = world.sweep(alphas, (dset, index, site), sampler_of(world, site))
    per_seed = seed_slopes(base_factors, world.factors(images), alphas)
    slope = per_seed.mean(0)
    factor = int(np.abs(slope).argmax())
    record = {"site": site, "index": index, "factor": FACTORS[factor], "slope": round(float(slope[factor]), 4),
              "effect": round(effect(slope), 4), "purity": round(purity(slope), 3),
              "slopes": [round(float(s), 4) for s in slope],
              "preservation_db": preservation(base_images, base_factors, images, slope, alphas)}
    if stored is not None:
        cache.write(stored, per_seed, record)
    return per_seed, record


def own_face_edits(world, sets, originals, inverted_latent, reconstructed_factors, plan: dict, log) -> dict:
    """The regime Directions From Image is for: an artist's own image. Per held-out face (the first
    ``own_faces`` of those inverted), its own Jacobian directions (``plan["jacobian"]`` per site, the node on the
    face's clean latent) applied to it inverted and sampled back, against the same number of the reference
    method's directions applied to the same face (whitened eigendirections at attention sites, principal
    directions at h-space): per site, the median over faces of the strongest Jacobian direction's effect over the
    strongest reference direction's, with their range, and the median effects."""
    count, faces = plan["jacobian"], min(plan["own_faces"], len(originals))
    sites = list(sets["jacobian"].sites)
    references = {site: "hspace-pca" if site == "h_space" else "whitened" for site in sites}

    def strongest(face, dset, site):
        alphas = linear_alphas(site, plan)
        latent = {"samples": inverted_latent["samples"][face:face + 1]}
        slopes = [seed_slopes(reconstructed_factors[face:face + 1], world.factors(sample_back(
            world, latent, alphas, (dset, k, site), sampler_of(world, site))[0])[None], alphas)[0]
            for k in range(min(count, dset.sites[site].count))]
        return max(effect(s) for s in slopes)
    table = {site: {"reference": references[site], "jacobian": [], "reference_effects": []} for site in sites}
    for face in range(faces):
        own = jacobian_set(world, count, ", ".join(sites), originals[face:face + 1])
        for site in sites:
            table[site]["jacobian"].append(strongest(face, own, site))
            table[site]["reference_effects"].append(strongest(face, sets[references[site]], site))
        log(f"own-face edits: face {face + 1} of {faces}")
    report = {}
    for site, row in table.items():
        ratios = np.array(row["jacobian"]) / np.maximum(np.array(row["reference_effects"]), 1e-12)
        report[site] = {"reference": row["reference"], "ratio_median": round(float(np.median(ratios)), 2),
                        "ratio_range": [round(float(ratios.min()), 2), round(float(ratios.max()), 2)],
                        "jacobian_effect_median": round(float(np.median(row["jacobian"])), 4),
                        "reference_effect_median": round(float(np.median(row["reference_effects"])), 4),
                        "faces": faces}
    return report


def ceiling_sets(world, dset_module, model_entry, factors_by_site: dict, log, cache: SweepCache | None = None):
    """Per site, a set of the supervised directions for the given factors, and which (kind, factor) each
    index is."""
    def make(site, factors):
        directions = ceiling_directions(world.factor_gradients(site))
        kept = [(key, v) for key, v in directions.items() if v is not None and key[1] in factors]
        dset = unit_set(dset_module, model_entry, {site: np.stack([v for _, v in kept])}, "ceiling")
        dset.params["meaning"] = [list(key) for key, _ in kept]
        return dset
    sets, meaning = {}, {}
    for site, factors in factors_by_site.items():
        sets[site] = cached(cache, f"ceiling {site}", lambda site=site, factors=factors: make(site, factors),
                            sorted(factors))
        meaning[site] = [tuple(key) for key in sets[site].params["meaning"]]
        log(f"ceiling directions at {site}: {len(meaning[site])}")
    return sets, meaning


def cached(cache: SweepCache | None, name: str, make, *inputs):
    """``make()``, or its set kept by ``cache`` (quick runs keep nothing)."""
    return make() if cache is None else cache.direction_set(name, make, *inputs)


def describe(kind: tuple) -> str:
    """("pure", 2) -> "pure face_hue": which ceiling direction it is."""
    return f"{kind[0]} {FACTORS[kind[1]]}"


def site_ceilings(results: Results, meaning: dict, means: dict) -> dict:
    """{site: {factor: {"effect", "purity", "direction"}}}: the most any ceiling direction at the site moved
    that factor, and the largest share of that factor in any ceiling direction's slopes."""
    table = {}
    for site, kinds in meaning.items():
        table[site] = {}
        keys = [("ceiling", site, i) for i in range(len(kinds))]
        for f in sorted({kind[1] for kind in kinds}):
            name = FACTORS[f]
            strongest = max(keys, key=lambda k: abs(means[k][f]))
            purest = max(keys, key=lambda k: purity(means[k], f))
            table[site][name] = {"effect": round(abs(float(means[strongest][f])), 4),
                                 "purity": round(purity(means[purest], f), 3),
                                 "effect_direction": describe(kinds[strongest[2]]),
                                 "purity_direction": describe(kinds[purest[2]])}
    return table


def named_pairs(results, means, sets, ceiling_table, resamples, method: str, factors: tuple) -> dict:
    """Per factor in ``factors`` (the pair set's order), its example-pair direction (``method``: "pair",
    "pair-matched" or "pair-conditional") at the site where it moves its named factor most over the best random
    direction there: that slope, the ratio (with its bootstrap interval), the named factor's purity and that
    purity over the site's ceiling for the factor, the ceiling's own effect over the same random best (what any
    direction there can reach); and at how many sites the ratio reaches 5."""
    named = {}
    for i, name in enumerate(factors):
        rows, f = [], FACTORS.index(name)
        for site in sets[method].sites:
            key, random = (method, site, i), results.keys(RANDOM[family(site)], site)

            def ratio(m, key=key, random=random, f=f):
                return abs(float(m[key][f])) / max(effect(m[k]) for k in random)
            ceiling = ceiling_table.get(site, {}).get(name)
            rows.append({"site": site, "named_slope": round(float(means[key][f]), 4),
                         "ratio_vs_random": round(ratio(means), 2), "ratio": ratio,
                         "purity": round(purity(means[key], f), 3),
                         "purity_vs_ceiling": round(purity(means[key], f) / max(ceiling["purity"], 1e-12), 3)
                         if ceiling else None,
                         "ceiling_ratio_vs_random": round(ceiling["effect"] / max(effect(means[k]) for k in random), 2)
                         if ceiling else None})
        best = max(rows, key=lambda r: r["ratio_vs_random"])
        named[name] = {**{k: v for k, v in best.items() if k != "ratio"},
                       "ratio_ci95": [round(v, 2) for v in results.bootstrap(best["ratio"], resamples)],
                       "sites_at_5x_random": sum(r["ratio_vs_random"] >= 5 for r in rows)}
    return named


def main():
    args = arguments(__doc__, quick="fewer seeds, sites and directions: minutes, for development")
    plan = QUICK if args.quick else FULL
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    threads = idle_threads() if args.device == "cpu" else (torch.get_num_threads(), "torch's default")
    torch.set_num_threads(threads[0])  # the figures are slopes, not timings: threads that would wait are left out
    timings, started = {}, [time.perf_counter()]

    def phase(name):  # seconds spent since the previous phase ended
        now = time.perf_counter()
        timings[name], started[0] = round(now - started[0], 1), now
    host = start_host(args.device)
    world = World(host, plan["seeds"])
    from semantic_directions.directions import directionset as dset_module
    from semantic_directions.nodes.host import made_for
    model_entry = made_for(world.model)
    base_images = world.sweep([0.0])
    base_factors = world.factors(base_images)[:, 0]

    discover = world.registry["DiscoverAttentionEigendirections"]()
    sets = {method: discover.discover(world.model, "all", plan["per_site"], method, 1.0)[0]
            for method in ("whitened", "value", "qkv-stack")}

    cache = None if args.quick else SweepCache(world)
    sets["hspace-pca"] = cached(cache, "hspace-pca", lambda: hspace_set(world, plan["hspace"]), plan["hspace"])
    pair_inputs = (plan["pair_faces"], plan["pair_factors"])
    sets["pair"] = cached(cache, "pair", lambda: pair_set(world, dset_module, model_entry, *pair_inputs, log),
                          *pair_inputs)
    sets["pair-conditional"] = conditional_set(world, dset_module, sets["pair"])  # a projection: no model calls
    if not args.quick:  # quick keeps its time for development
        sets["pair-matched"] = cached(cache, "pair-matched", lambda: pair_set(
            world, dset_module, model_entry, *pair_inputs, log, matched=True), *pair_inputs)
    jacobian_sites = ", ".join((*plan["sites"], "h_space")) if plan["sites"] else "all"
    sets["jacobian"] = cached(cache, "jacobian", lambda: jacobian_set(world, plan["jacobian"], jacobian_sites),
                              plan["jacobian"], jacobian_sites)
    sets["jacobian-faces"] = cached(cache, "jacobian-faces", lambda: jacobian_set(
        world, plan["jacobian"], jacobian_sites, faces=plan["jacobian_faces"]), plan["jacobian"], jacobian_sites,
        plan["jacobian_faces"])
    if plan["sites"]:  # quick: the chosen attention sites and h-space only
        kept = (*plan["sites"], "h_space")
        sets = {m: dset_module.DirectionSet(sites={k: v for k, v in s.sites.items() if k in kept},
                                            method=s.method, model=s.model, params=s.params) for m, s in sets.items()}
    attention_widths = {site: s.width for site, s in sets["whitened"].sites.items()}
    sets["random-attention"] = random_set(dset_module, model_entry, attention_widths, plan["per_site"], 1,
                                          "random-attention")
    sets["random-hspace"] = random_set(dset_module, model_entry, {"h_space": sets["hspace-pca"].sites["h_space"].width},
                                       plan["hspace"], 2, "random-hspace")
    results = Results()

    def measure_all(method, dset):
        for site, directions in dset.sites.items():
            for index in range(directions.count):
                per_seed, record = measure_direction(world, dset, site, index, base_images, base_factors,
                                                        linear_alphas(site, plan), cache)
                results.add((method, site, index), per_seed, record)
                log(method, record)
    phase("discovery_and_hspace_pca")
    for method, dset in sets.items():
        measure_all(method, dset)
    phase("method_sweeps")
    sites_measured = [*attention_widths, "h_space"]
    if args.quick:  # only the factors that some method's best direction at a site moves
        means = results.means()
        needed = {site: {FACTORS.index(results.records[results.best(m, means, site)]["factor"])
                         for m in sets if results.keys(m, site)} for site in sites_measured}
    else:
        needed = {site: set(range(len(FACTORS))) for site in sites_measured}
    ceilings, meaning = ceiling_sets(world, dset_module, model_entry, needed, log, cache)
    phase("ceiling_gradients")
    for dset in ceilings.values():
        measure_all("ceiling", dset)
    phase("ceiling_sweeps")

    means = results.means()
    resamples = bootstrap_resamples(plan["seeds"])
    ceiling_table = site_ceilings(results, meaning, means)
    originals, inverted_latent = inverted(world, plan["held_out"])
    reconstructed = sample_back(world, inverted_latent, [0.0])
    reconstructed_factors = world.factors(reconstructed)[:, 0]
    methods, rows = {}, []
    for method, dset in sets.items():
        key = results.best(method, means)
        best = dict(results.records[key])
        factor = FACTORS.index(best["factor"])
        site_ceiling = ceiling_table[key[1]][best["factor"]]
        alphas, saturating = linear_alphas(key[1], plan), saturation_alphas(key[1], plan)
        direction = (dset, key[2], key[1])
        edited = sample_back(world, inverted_latent, alphas, direction, sampler_of(world, key[1]))
        on_inverted = seed_slopes(reconstructed_factors, world.factors(edited), alphas).mean(0)
        saturated = world.sweep(saturating, direction, sampler_of(world, key[1]))
        change = (world.factors(saturated)[..., factor] - base_factors[:, None, factor]).mean(0)
        figures = {"best": best, "best_effect": best["effect"],
                   "purity_vs_ceiling": round(best["purity"] / max(site_ceiling["purity"], 1e-12), 3),
                   "effect_vs_ceiling": round(best["effect"] / max(site_ceiling["effect"], 1e-12), 3),
                   "inverted_transfer": round(float(on_inverted[factor] / best["slope"]), 3),
                   "inverted_slopes": [round(float(s), 4) for s in on_inverted],
                   "saturation": {f"{a:g}": round(float(c), 4) for a, c in zip(saturating, change)},
                   "directions": len(results.keys(method)),
                   "effect_median": round(float(np.median([effect(means[k]) for k in results.keys(method)])), 4)}
        figures.update({
            "best_ratio_vs_random": round(results.best_ratio(method, means), 2),
            "best_ratio_ci95": [round(v, 2) for v in results.bootstrap(
                lambda m, method=method: results.best_ratio(method, m), resamples)],
            "median_ratio_vs_random": round(results.median_ratio(method, means), 2),
            "median_ratio_ci95": [round(v, 2) for v in results.bootstrap(
                lambda m, method=method: results.median_ratio(method, m), resamples)]})
        methods[method] = figures
        label = (f"{method}\n{key[1].replace('.transformer_blocks.0.attn1', '')} #{key[2]}\n"
                 f"{best['factor']} {best['slope']:+.3f}/alpha\npurity {best['purity']:.2f}, a = {max(alphas):g}")
        rows.append((label, base_images, saturated))
        log(method, figures)

    sites = {}
    for site in ceiling_table:
        per_method = {}
        for method in sets:
            keys = results.keys(method, site)
            if not keys:
                continue
            key = results.best(method, means, site)
            record = results.records[key]
            per_method[method] = {"index": key[2], "factor": record["factor"], "effect": record["effect"],
                                  "purity": record["purity"],
                                  "purity_vs_ceiling": round(record["purity"] / max(
                                      ceiling_table[site][record["factor"]]["purity"], 1e-12), 3),
                                  "ratio_vs_random": round(results.site_ratio(method, site, means), 2)}
        sites[site] = {"methods": per_method, "ceiling": ceiling_table[site]}
        for method in ("jacobian", "jacobian-faces"):
            if method in per_method and "whitened" in per_method:
                sites[site][f"{method.replace('-', '_')}_over_whitened"] = round(
                    per_method[method]["effect"] / max(per_method["whitened"]["effect"], 1e-12), 2)

    pair_named = {method: named_pairs(results, means, sets, ceiling_table, resamples, method, plan["pair_factors"])
                  for method in ("pair", "pair-matched", "pair-conditional") if method in sets}
    phase("inversion_transfer_and_saturation")
    own_faces = own_face_edits(world, sets, originals, inverted_latent, reconstructed_factors, plan, log)
    phase("own_face_edits")
    picture_path = QUICK_PICTURE if args.quick else PICTURE
    picture(rows, picture_path)
    faces = quality.generator_faces(plan["oracle_faces"])
    samples = quality.sample_quality(quality.sample(world.model, plan["samples"]))
    oracle = quality.oracle_x0_psnr(faces)
    phase("world_quality_and_oracle")
    report({
        "device": args.device, "threads": list(threads), "quick": args.quick, "seeds": plan["seeds"], "steps": STEPS,
        "jacobian_faces": plan["jacobian_faces"],
        "linear_alphas": list(plan["alphas"]["attention"]), "hspace_linear_alphas": list(plan["alphas"]["hspace"]),
        "saturation_multiples": list(SATURATION),
        "regressor_factors": list(FACTORS), "bootstrap_resamples": len(resamples),
        "world_x0_psnr": {f"{s:g}": round(quality.model_x0_psnr(world.model, faces, s), 2) for s in quality.SIGMAS},
        "oracle_x0_psnr": {s: round(o["psnr"], 2) for s, o in oracle.items()},
        "oracle_agreement_db": {s: round(o["agreement"], 2) for s, o in oracle.items()},
        "x0_psnr_faces": len(faces),
        "sample_redraw_psnr_median": round(samples["redraw_psnr_median"], 2),
        "noisy_samples": samples["noisy_samples"], "samples": plan["samples"],
        "inversion_psnr": round(psnr(reconstructed[:, 0], originals), 2),
        "inversion_factor_error": round(float(np.abs(reconstructed_factors - world.factors(originals)).mean()), 4),
        "methods": methods, "pair_named": pair_named["pair"], "pair_matched_named": pair_named.get("pair-matched"),
        "pair_conditional_named": pair_named.get("pair-conditional"),
        "sites": sites,
        **{f"{name}_at_least_whitened_sites": [sum(s.get(f"{name}_over_whitened", 0) >= 1 for s in sites.values()),
                                               sum(f"{name}_over_whitened" in s for s in sites.values())]
           for name in ("jacobian", "jacobian_faces")},
        "own_face_edits": own_faces,
        "jacobian_own_face_at_least_reference_sites": [sum(r["ratio_median"] >= 1 for r in own_faces.values()),
                                                       len(own_faces)],
        "picture": str(picture_path), "timings_s": timings, "sweeps_from_cache": cache.hits if cache else 0,
        "direction_sets_from_cache": cache.set_hits if cache else 0,
    }, args.json)


if __name__ == "__main__":
    main()
