"""Directions from samples and pairs: record a site's activations while the host samples, then take
their principal directions (Asyrp's h-space analysis) or the difference between two batches (a named
direction: two prompts, or examples with and without an attribute)."""
import logging

import torch
from einops import rearrange

import comfy.utils

from ..directions.activations import mean_difference, principal_directions
from ..directions.apply import rms_token_norm
from ..directions.directionset import ATTN1, DIT, HSPACE, DirectionSet, SiteDirections, site_kind
from . import host
from .common import CATEGORY, DIRECTIONS, finite, finite_tensor

SITE_TOOLTIP = ("Where to record: h_space (the middle block's output), or comma-separated attention layer paths, "
                "prefixes or groups (input, middle, output, all; on transformer models double, single, joint, "
                "transformer), as in Apply Direction.")


class SiteRecorder:
    """Records, for the conditional pass's rows inside the sigma range, each image's tokens at the sites
    averaged over positions, and their RMS token norm, per sigma. Attach with :meth:`attach`."""

    def __init__(self, sites: list, sigma_start: float, sigma_end: float):
        self.sites_by_block = {host.block_key(s): s for s in sites if site_kind(s) == ATTN1}
        self.transformer_sites = [s for s in sites if site_kind(s) == DIT]
        self.hspace, self.sigma_start, self.sigma_end = HSPACE in sites, sigma_start, sigma_end
        self.records = {}  # site -> {sigma: {image: (mean token [C] float64, RMS token norm)}}

    def __deepcopy__(self, memo):  # host clones copy model_options; one recorder serves the clone it was put on
        return self

    def attach(self, patcher):
        """A clone of ``patcher`` that records as it samples."""
        recording = patcher.clone()
        if self.sites_by_block:
            recording.set_model_attn1_patch(self.attention_input)
        if self.hspace:
            recording.set_model_output_block_patch(self.middle_output)
        if self.transformer_sites:
            blocks = host.dit.sites(patcher)
            host.dit.add_shifts(recording, [(host.dit.first_linear(blocks[path]),
                                             self.transformer_input(path, blocks[path]))
                                            for path in self.transformer_sites])
        return recording

    def transformer_input(self, path, site):
        """A transformer site's hook: records the latent's image tokens of the linear's input, moves nothing."""
        def record(call, x, out, image_of, rows):
            if host.has_batch_keys(call.options, grid=False):
                self.record(path, x[:, host.dit.image_token_range(site, call)], call.options)
            return out
        return record

    def attention_input(self, n, context_attn1, value_attn1, extra_options):
        site = self.sites_by_block.get(host.attn1_block(extra_options))
        if site is not None and host.has_batch_keys(extra_options, grid=False):
            self.record(site, n, extra_options)
        return n, context_attn1, value_attn1

    def middle_output(self, h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0) and host.has_batch_keys(transformer_options, grid=False):
            self.record(HSPACE, rearrange(h, "b c h w -> b (h w) c"), transformer_options)
        return h, hsp

    def record(self, site, tokens, options):
        rows = host.batch_rows(options, tokens.shape[0], (host.COND,))
        keep = rows.edited & (rows.sigma <= self.sigma_start) & (rows.sigma >= self.sigma_end)
        if not keep.any():
            return
        means, norms = tokens.float().mean(1).double().cpu(), rms_token_norm(tokens).double().cpu()
        by_sigma = self.records.setdefault(site, {})
        for r in keep.nonzero().flatten().tolist():
            by_sigma.setdefault(float(rows.sigma[r]), {})[int(rows.image[r])] = (means[r], float(norms[r]))

    def features(self, site: str, images: int, sigmas=None):
        """([T, images, C] mean tokens at the sigmas where every image was recorded, highest first, or at
        ``sigmas``), and the mean RMS token norm there."""
        by_sigma = self.records.get(site, {})
        chosen = sorted(s for s in (sigmas if sigmas is not None else by_sigma) if len(by_sigma.get(s, ())) == images)
        if not chosen:
            raise ValueError("start_percent, end_percent: no sampling step fell inside this range; widen it or "
                             "raise steps")
        rows = [[by_sigma[s][i] for i in range(images)] for s in reversed(chosen)]
        features = torch.stack([torch.stack([mean for mean, _ in row]) for row in rows])
        return features, sum(norm for row in rows for _, norm in row) / (len(rows) * images)

    @property
    def sites(self) -> list:
        return [*self.sites_by_block.values(), *self.transformer_sites, *([HSPACE] if self.hspace else [])]

    def sigmas(self, site: str, images: int) -> set:
        return {s for s, recorded in self.records.get(site, {}).items() if len(recorded) == images}


def common_inputs() -> dict:
    return {
        "site": ("STRING", {"default": HSPACE, "tooltip": SITE_TOOLTIP}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                          "Record from here in model time (0 = first step, highest noise): use the range you will "
                          "edit in."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                        "Record until here in model time (1 = last step)."}),
    }


def recorder_for(model, site: str, start_percent: float, end_percent: float) -> SiteRecorder:
    start_percent, end_percent = finite("start_percent", start_percent), finite("end_percent", end_percent)
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}); the range must start "
                         f"before it ends")
    sites = host.select_layers(host.site_paths(model), site, input_name="site")
    sampling = host.model_sampling(model)
    return SiteRecorder(sites, sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent))


def checked_latent(model, latent: dict, name: str) -> int:
    samples = latent["samples"]
    host.check_latent_fits(model, samples, name)
    if samples.shape[0] < 1:
        raise ValueError(f"{name}: the latent batch is empty")
    finite_tensor(name, samples, "latent's values")
    return samples.shape[0]


def record(model, recorder, latent, positive, negative, sampling: dict, progress):
    """Sample ``latent`` with the recorder attached; returns the samples as a LATENT."""
    samples = host.sample(recorder.attach(model), latent, positive, negative, progress=progress, **sampling)
    return {**latent, "samples": samples}


def sampling_of(seed, add_noise, steps, cfg, sampler_name, scheduler) -> dict:
    return {"seed": seed, "add_noise": add_noise == "enable", "steps": steps, "cfg": finite("cfg", cfg),
            "sampler_name": sampler_name, "scheduler": scheduler}


class DirectionsFromSamples:
    DESCRIPTION = (
        "Samples the latent batch (from seeds, or DDIM Invert's noise with add_noise disabled) and returns the "
        "principal directions of the site's activations across the images, strongest first: the ways the "
        "model's images differ most there (Asyrp's h-space analysis; attention layers work too). Each "
        "direction's gain is its spread, in the site's units. Unsupervised: sweep them to see what each does.")
    CATEGORY = CATEGORY
    FUNCTION = "directions"
    RETURN_TYPES = (DIRECTIONS, "LATENT")
    RETURN_NAMES = ("directions", "samples")
    OUTPUT_TOOLTIPS = ("count directions per site, for Apply Direction (h_space: with the Asyrp Sampler).",
                       "The sampled batch the directions come from, to decode and look at.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose activations are recorded."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt the batch is sampled with."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (used when cfg is not 1)."}),
            "latent": ("LATENT", {"tooltip": "A batch of at least 2 images (16 or more give steadier directions)."}),
            **host.sampling_inputs(),
            **common_inputs(),
            "count": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "Directions per site."}),
        }}

    def directions(self, model, positive, negative, latent, seed, add_noise, steps, cfg, sampler_name, scheduler,
                   site, start_percent, end_percent, count):
        images = checked_latent(model, latent, "latent")
        if images < 2:
            raise ValueError("latent: principal directions need a batch of at least 2 images; raise batch_size")
        recorder = recorder_for(model, site, start_percent, end_percent)
        progress = comfy.utils.ProgressBar(steps)
        samples = record(model, recorder, latent, positive, negative,
                         sampling_of(seed, add_noise, steps, cfg, sampler_name, scheduler), progress)
        sites = {}
        for name in recorder.sites:
            features, _ = recorder.features(name, images)
            vectors, spread = principal_directions(features, count)
            if len(vectors) < count:
                logging.warning("Directions From Samples: %d images on %d steps span only %d directions at %s; "
                                "more images or a wider step range give more", images, features.shape[0],
                                len(vectors), name)
            sites[name] = SiteDirections(vectors, spread)
        params = {"site": site, "count": count, "images": images, "steps": steps, "cfg": cfg,
                  "start_percent": start_percent, "end_percent": end_percent}
        return (DirectionSet(sites=sites, method="samples-pca", params=params, model=host.made_for(model)), samples)


def pair_set(model, source_recorder, target_recorder, source_images, target_images, names, method, params):
    """One direction per site from source to target, its natural strength (in site RMS units) as its gain."""
    sites = {}
    for name in source_recorder.sites:
        shared = source_recorder.sigmas(name, source_images) & target_recorder.sigmas(name, target_images)
        source, source_scale = source_recorder.features(name, source_images, shared)
        target, target_scale = target_recorder.features(name, target_images, shared)
        vector, strength = mean_difference(source, target, (source_scale + target_scale) / 2)
        sites[name] = SiteDirections(vector[None], torch.tensor([strength], dtype=torch.float32))
    params = {**params, "source": names[0], "target": names[1], "alpha_unit": "pair"}
    return DirectionSet(sites=sites, method=method, params=params, model=host.made_for(model))


PAIR_NOTE = ("Its gain is the pair's natural strength, and Apply Direction counts alpha in it: 1 moves the site by "
             "the pair's whole difference, 0.5 half-way, -1 the other way.")


class DirectionFromPromptPair:
    DESCRIPTION = (
        "A named direction: samples the same latent batch (same seeds) with a source and a target prompt, and "
        "returns the normalised mean difference of the site's activations between them over the range. "
        + PAIR_NOTE + " The names go into the set, so its summary says what it does.")
    CATEGORY = CATEGORY
    FUNCTION = "direction"
    RETURN_TYPES = (DIRECTIONS, "LATENT", "LATENT")
    RETURN_NAMES = ("directions", "source_samples", "target_samples")
    OUTPUT_TOOLTIPS = ("One direction per site, from source to target.",
                       "The batch sampled with the source prompt.", "The batch sampled with the target prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose activations are recorded."}),
            "source": ("CONDITIONING", {"tooltip": "The prompt without the attribute, e.g. 'a photo of a face'."}),
            "target": ("CONDITIONING", {"tooltip": "The same prompt with it, e.g. 'a photo of a smiling face'."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt for both (used when cfg is not 1)."}),
            "latent": ("LATENT", {"tooltip": "The batch both prompts are sampled on (more images: steadier)."}),
            **host.sampling_inputs(),
            **common_inputs(),
            "source_name": ("STRING", {"default": "neutral", "tooltip": "What the source shows, for the summary."}),
            "target_name": ("STRING", {"default": "smiling", "tooltip": "What the target adds, for the summary."}),
        }}

    def direction(self, model, source, target, negative, latent, seed, add_noise, steps, cfg, sampler_name, scheduler,
                  site, start_percent, end_percent, source_name, target_name):
        images = checked_latent(model, latent, "latent")
        for name, conditioning in (("source", source), ("target", target)):
            host.check_conditioning_fits(model, conditioning, name)
        shapes = [[list(tensor.shape) for tensor, _ in conditioning] for conditioning in (source, target)]
        if shapes[0] != shapes[1]:
            raise ValueError(f"target: its conditioning has shape {shapes[1]} but the source's {shapes[0]}; the two "
                             f"prompts must encode to the same length and batch (keep both under 75 tokens)")
        sampling = sampling_of(seed, add_noise, steps, cfg, sampler_name, scheduler)
        progress = comfy.utils.ProgressBar(2 * steps)
        recorders, outputs = [], []
        for conditioning in (source, target):
            recorders.append(recorder_for(model, site, start_percent, end_percent))
            outputs.append(record(model, recorders[-1], latent, conditioning, negative, sampling, progress))
        params = {"site": site, "images": images, "steps": steps, "cfg": cfg, "start_percent": start_percent,
                  "end_percent": end_percent}
        dset = pair_set(model, *recorders, images, images, (source_name, target_name), "pair-prompts", params)
        return (dset, *outputs)


class DirectionFromExamplePair:
    DESCRIPTION = (
        "A named direction from examples: two latent batches, images without and with an attribute (usually DDIM "
        "Invert's outputs of photos, sampled back with add_noise disabled), each sampled with the same prompt; "
        "returns the normalised difference of the site's mean activations from the first batch to the second. "
        + PAIR_NOTE)
    CATEGORY = CATEGORY
    FUNCTION = "direction"
    RETURN_TYPES = (DIRECTIONS,)
    RETURN_NAMES = ("directions",)
    OUTPUT_TOOLTIPS = ("One direction per site, from the first batch to the second.",)

    @classmethod
    def INPUT_TYPES(cls):
        sampling = host.sampling_inputs()
        sampling["add_noise"] = (sampling["add_noise"][0], {**sampling["add_noise"][1], "default": "disable"})
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose activations are recorded."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt both batches are sampled with (one that fits both)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (used when cfg is not 1)."}),
            "without": ("LATENT", {"tooltip": "Images without the attribute (a batch; sizes of the two may differ)."}),
            "with_attribute": ("LATENT", {"tooltip": "Images with it."}),
            **sampling,
            **common_inputs(),
            "without_name": ("STRING", {"default": "without", "tooltip": "What the first batch shows."}),
            "with_name": ("STRING", {"default": "with", "tooltip": "What the second batch adds."}),
        }}

    def direction(self, model, positive, negative, without, with_attribute, seed, add_noise, steps, cfg, sampler_name,
                  scheduler, site, start_percent, end_percent, without_name, with_name):
        counts = [checked_latent(model, latent, name) for name, latent in
                  (("without", without), ("with_attribute", with_attribute))]
        sampling = sampling_of(seed, add_noise, steps, cfg, sampler_name, scheduler)
        progress = comfy.utils.ProgressBar(2 * steps)
        recorders = []
        for latent in (without, with_attribute):
            recorders.append(recorder_for(model, site, start_percent, end_percent))
            record(model, recorders[-1], latent, positive, negative, sampling, progress)
        params = {"site": site, "images": counts, "steps": steps, "cfg": cfg, "start_percent": start_percent,
                  "end_percent": end_percent}
        return (pair_set(model, *recorders, *counts, (without_name, with_name), "pair-examples", params),)


NODE_CLASS_MAPPINGS = {"DirectionsFromSamples": DirectionsFromSamples,
                       "DirectionFromPromptPair": DirectionFromPromptPair,
                       "DirectionFromExamplePair": DirectionFromExamplePair}
NODE_DISPLAY_NAME_MAPPINGS = {"DirectionsFromSamples": "Directions From Samples (PCA)",
                              "DirectionFromPromptPair": "Direction From Prompt Pair",
                              "DirectionFromExamplePair": "Direction From Example Pair"}
