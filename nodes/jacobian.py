"""Directions From Image (Jacobian): the shifts at a site that change one image's denoised prediction most."""
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from einops import rearrange

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..directions.apply import image_scales
from ..directions.directionset import ATTN1, DIT, HSPACE, DirectionSet, SiteDirections, site_kind
from ..directions.jacobian import jacobian_directions
from . import host
from .apply import as_mask_batch
from .common import CATEGORY, DIRECTIONS, finite
from .samples import SITE_TOOLTIP, checked_latent

CHUNK = 16  # Jacobian columns per batched model call


class TangentShift:
    """attn1_patch, output_block_patch and a transformer site's hook: add to each image row of the batch a zero
    shift at the site, in Apply Direction's units (the image's RMS token norm, averaged over its rows), whose
    forward-mode tangent is that image's basis vector; the model's output tangent is then J times it."""

    def __init__(self, site: str):
        self.site, self.tangents = site, None
        self.block = host.block_key(site) if site_kind(site) == ATTN1 else None

    def __deepcopy__(self, memo):
        return self

    def attention_input(self, n, context_attn1, value_attn1, extra_options):
        if self.block is None or host.attn1_block(extra_options) != self.block:
            return n, context_attn1, value_attn1
        return host.attn1_shifted(n, context_attn1, value_attn1, self.shifted(n, extra_options))

    def middle_output(self, h, hsp, transformer_options):
        if self.site != HSPACE or transformer_options.get("block") != ("output", 0):
            return h, hsp
        tokens = self.shifted(rearrange(h, "b c h w -> b (h w) c"), transformer_options)
        return rearrange(tokens, "b (h w) c -> b c h w", h=h.shape[-2]), hsp

    def transformer_input(self, site):
        """A transformer site's hook: the same zero shift, carried into the q, k and v rows of its linear's output
        through the linear's own image of the tangent (tokens other than the latent's image tokens stay)."""
        def shift(call, x, out, image_of, rows):
            if not host.has_batch_keys(call.options, grid=False):
                return out
            tokens = host.dit.image_token_range(site, call)
            batch = host.batch_rows(call.options, x.shape[0], host.PASSES["both"])
            scale = image_scales(x[:, tokens], batch).to(x.dtype)
            tangents = self.tangents.to(x.device, x.dtype)[batch.image.to(x.device)]
            moved = image_of(forward_ad.make_dual(torch.zeros_like(tangents), tangents) * scale[:, None])[:, :rows]
            count = tokens.stop - tokens.start
            return out + F.pad(moved[:, None, :].expand(-1, count, -1),
                               (0, out.shape[-1] - rows, tokens.start, out.shape[1] - tokens.stop))
        return shift

    def shifted(self, tokens, options):
        rows = host.batch_rows(options, tokens.shape[0], host.PASSES["both"])
        scale = image_scales(tokens, rows).to(tokens.dtype)
        tangents = self.tangents.to(tokens.device, tokens.dtype)[rows.image.to(tokens.device)]
        shift = forward_ad.make_dual(torch.zeros_like(tangents), tangents)
        return tokens + (scale[:, None] * shift)[:, None, :]


class JacobianRun(comfy.samplers.Sampler):
    """Inside the host's guider (conditioning, CFG, model loading): the image noised to the schedule's sigma,
    then the Jacobian's columns a chunk at a time; returns the latent unchanged."""

    def __init__(self, patch: TangentShift, width: int, progress):
        self.patch, self.width, self.progress, self.columns = patch, width, progress, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling
        x = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        columns = []
        for start in range(0, self.width, CHUNK):
            comfy.model_management.throw_exception_if_processing_interrupted()
            chunk = torch.eye(self.width)[start:start + CHUNK]
            self.patch.tangents = chunk
            batch = x.expand(len(chunk), *x.shape[1:]).contiguous()
            with forward_ad.dual_level():
                out = model_wrap(batch, sigmas[0] * batch.new_ones(len(chunk)),
                                 model_options=extra_args["model_options"], seed=extra_args.get("seed"))
                tangent = forward_ad.unpack_dual(out).tangent
            if tangent is None:
                raise ValueError(f"site: {self.patch.site} did not reach the model's output (is it used by this model?)")
            columns.append(in_latent_units(model_wrap.inner_model, tangent).flatten(1).float().cpu())
            self.progress.update(1)
        self.columns = torch.cat(columns).T  # [outputs, width]
        return latent_image


def in_latent_units(model, tangent):
    """A change of the model's prediction in the LATENT's own units: the linear part of the host's
    process_latent_out (its scale factor; some formats also shift, which a change does not carry)."""
    return model.process_latent_out(tangent) - model.process_latent_out(torch.zeros_like(tangent))


class DirectionsFromImage:
    DESCRIPTION = (
        "Directions for one image: the shifts at a site that change the model's denoised prediction of this image "
        "most, at one point of the schedule (the top right singular vectors of that change's Jacobian, from the "
        "host's own model by forward-mode derivatives). With a mask, the change inside the mask counts (localised "
        "edits). Gains: the change of the prediction per unit alpha. Costs one model row per channel of the site.")
    CATEGORY = CATEGORY
    FUNCTION = "directions"
    RETURN_TYPES = (DIRECTIONS,)
    RETURN_NAMES = ("directions",)
    OUTPUT_TOOLTIPS = ("count directions per site, strongest first, for Apply Direction.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose prediction is differentiated."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt describing the image."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (used when cfg is not 1)."}),
            "latent": ("LATENT", {"tooltip": "One image's clean latent (VAEEncode of a photo, or a sampled image); "
                                             "the first of a batch is used."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                     "The noise the image is noised with to the chosen point."}),
            "percent": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "The point of the schedule, in model time (0 = the noisiest step, 1 = the last); where "
                        "edits of structure start, 0.2 to 0.4, is a good place."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                    "Guidance of the prediction differentiated (1: the prompt's prediction alone)."}),
            "site": ("STRING", {"default": HSPACE, "tooltip": SITE_TOOLTIP}),
            "count": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "Directions per site."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Where the change counts (resized to the latent): the directions change "
                                         "the masked region most."}),
        }}

    def directions(self, model, positive, negative, latent, seed, percent, cfg, site, count, mask=None):
        checked_latent(model, latent, "latent")
        finite("percent", percent)
        finite("cfg", cfg)
        samples = latent["samples"][:1]
        sites = host.select_layers(host.site_paths(model), site, input_name="site")
        widths, blocks = host.site_widths(model), host.dit.sites(model)
        if HSPACE in sites:
            widths[HSPACE] = host.hspace_width(model)
        weights = None if mask is None else latent_weights(as_mask_batch(mask)[:1], samples.shape)
        if weights is not None and not weights.any():
            raise ValueError("mask: it is empty at the latent's resolution; paint the region the edit should change")
        sampling = host.model_sampling(model)
        sigmas = torch.tensor([float(sampling.percent_to_sigma(percent)), 0.0])
        noise = comfy.sample.prepare_noise(samples, seed)
        progress = comfy.utils.ProgressBar(sum(-(-widths[s] // CHUNK) for s in sites))
        found = {}
        for name in sites:
            patch = TangentShift(name)
            patched = model.clone()
            if site_kind(name) == ATTN1:
                patched.set_model_attn1_patch(patch.attention_input)
            elif site_kind(name) == DIT:
                host.dit.add_shifts(patched, [(blocks[name], patch.transformer_input(blocks[name]))])
            else:
                patched.set_model_output_block_patch(patch.middle_output)
            run = JacobianRun(patch, widths[name], progress)
            guider = comfy.samplers.CFGGuider(patched)
            guider.set_conds(positive, negative)
            guider.set_cfg(cfg)
            with torch.inference_mode(False), torch.no_grad():  # forward-mode derivatives need neither
                guider.sample(noise, samples, run, sigmas, seed=seed, disable_pbar=True)
            vectors, gains = jacobian_directions(run.columns, count, weights)
            found[name] = SiteDirections(vectors, gains)
        params = {"site": site, "percent": percent, "seed": seed, "cfg": cfg, "count": count, "masked": mask is not None}
        return (DirectionSet(sites=found, method="jacobian", params=params, model=host.made_for(model)),)


def latent_weights(mask: torch.Tensor, shape) -> torch.Tensor:
    """A [1, H, W] mask as weights of the latent's entries [C * h * w] (area-resized; a latent cell wholly
    outside is 0)."""
    resized = F.interpolate(mask[:, None], size=tuple(shape[-2:]), mode="area")[0, 0]
    return resized.expand(shape[1], -1, -1).flatten()


NODE_CLASS_MAPPINGS = {"DirectionsFromImage": DirectionsFromImage}
NODE_DISPLAY_NAME_MAPPINGS = {"DirectionsFromImage": "Directions From Image (Jacobian)"}
