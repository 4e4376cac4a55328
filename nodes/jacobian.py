"""Directions From Image (Jacobian): the shifts at a site that change the denoised prediction of an image (or of a
batch of images, together) most."""
import functools
import logging
import warnings

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from einops import rearrange

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..directions.apply import image_scales, mask_to_tokens
from ..directions.attention import OVERSAMPLE
from ..directions.directionset import ATTN1, DIT, HSPACE, DirectionSet, SiteDirections, site_kind
from ..directions.jacobian import EXACT_WIDTH, jacobian_directions
from . import host
from .apply import as_mask_batch
from .common import CATEGORY, DIRECTIONS, finite
from .samples import SITE_TOOLTIP, checked_latent

FORWARD_CHUNK = 16  # forward-mode rows per model call (they keep no activations)
REVERSE_CHUNK = 4  # reverse-mode rows per model call: each keeps its activations for the backward pass


@functools.cache
def load_forward_mode_rules():
    """torch loads its forward-mode decompositions on the first dual tensor, scripting them with torch.jit.script,
    which torch 2.14 deprecates with a FutureWarning a user can do nothing about: load them once, with it silenced
    (through torch's private loader; a torch without it has nothing to silence here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        getattr(forward_ad, "_maybe_load_decompositions", lambda: None)()


class DerivativeShift:
    """attn1_patch, output_block_patch and a transformer site's hook: add to each image row of the batch its
    row of ``shifts`` [rows, C] at the site, in Apply Direction's units (the image's RMS token norm, averaged
    over its rows). The shifts are zero and carry the derivative: forward-mode tangents (the output's tangent
    is then J times them) or a leaf whose gradient the backward pass fills (J^T times the output's weights)."""

    def __init__(self, site: str):
        self.site, self.shifts = site, None
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
        """A transformer site's hook: the same shift, carried into the q, k and v rows of its linear's output
        through the linear's own image of it (tokens other than the latent's image tokens stay)."""
        def shift(call, x, out, image_of, rows):
            if not host.has_batch_keys(call.options, grid=False):
                return out
            tokens = host.dit.image_token_range(site, call)
            batch = host.batch_rows(call.options, x.shape[0], host.PASSES["both"])
            scale = image_scales(x[:, tokens], batch).to(x.dtype)
            moved = image_of(self.rows(batch, x) * scale[:, None])[:, :rows]
            count = tokens.stop - tokens.start
            return out + F.pad(moved[:, None, :].expand(-1, count, -1),
                               (0, out.shape[-1] - rows, tokens.start, out.shape[1] - tokens.stop))
        return shift

    def shifted(self, tokens, options):
        rows = host.batch_rows(options, tokens.shape[0], host.PASSES["both"])
        scale = image_scales(tokens, rows).to(tokens.dtype)
        return tokens + (scale[:, None] * self.rows(rows, tokens))[:, None, :]

    def rows(self, batch, like):
        """Each batch row's shift, on ``like``'s device and dtype (differentiably)."""
        return self.shifts.to(like.device, like.dtype)[batch.image.to(like.device)]


class ReverseModeFailed(RuntimeError):
    """Autograd refused a reverse pass through the model (or ran out of memory): J is formed instead."""


class JacobianRun(comfy.samplers.Sampler):
    """Inside the host's guider (conditioning, CFG, model loading): the images noised to the schedule's sigma,
    then ``solve(apply, apply_t, width)`` with products with the Jacobian J of their predictions stacked (image
    after image), J v (forward mode) and J^T u (reverse mode; None where the model refuses it: J is then formed),
    its result kept in ``found``; returns the latent unchanged. Each shift goes through the model once per image,
    and a call holds every image (the host tiles per-image conditioning over a batch, so row r is image r mod
    images): ``chunk`` counts model rows, a call holds chunk // images shifts, at least one."""

    def __init__(self, patch: DerivativeShift, width: int, solve, progress):
        self.patch, self.width, self.solve, self.progress = patch, width, solve, progress
        self.found, self.model_rows = None, {"forward": 0, "reverse": 0}
        self.chunk = {"forward": FORWARD_CHUNK, "reverse": REVERSE_CHUNK}

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling
        x = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        images = len(x)

        def predict(shifts):
            """The predictions [p, images * m] in the latent's units, each image shifted by each row of ``shifts``
            [p, C]: a model row per shift and image, the images tiled as the host tiles their conditioning."""
            self.patch.shifts = shifts.repeat_interleave(images, dim=0)
            batch = x.repeat(len(shifts), *[1] * (x.ndim - 1))
            out = model_wrap(batch, sigmas[0] * batch.new_ones(len(batch)),
                             model_options=extra_args["model_options"], seed=extra_args.get("seed"))
            return rearrange(in_latent_units(model_wrap.inner_model, out), "(p i) ... -> p (i ...)", i=images)

        def forward(chunk):  # [p, C] -> (J chunk^T)^T, [p, images * m]
            load_forward_mode_rules()
            try:
                with forward_ad.dual_level(), host.tangent_attention():
                    tangent = forward_ad.unpack_dual(predict(forward_ad.make_dual(torch.zeros_like(chunk),
                                                                                  chunk))).tangent
            except NotImplementedError as error:  # an operation of the model without a forward-mode rule
                raise RuntimeError(f"model: an operation in it has no forward-mode derivative, which Directions "
                                   f"From Image needs ({str(error).splitlines()[0]}); try the model unquantized, "
                                   f"or without the patch or attention option that brings that operation") from None
            return self.reached(tangent).float().cpu()

        def reverse(chunk):  # [p, images * m] -> (J^T chunk^T)^T, [p, C]
            shifts = torch.zeros(len(chunk), self.width, requires_grad=True)
            try:
                with torch.enable_grad(), host.differentiable(model_wrap.inner_model):
                    out = predict(shifts)
                    gradient, = torch.autograd.grad(out, shifts, chunk.to(out.device, out.dtype), allow_unused=True)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # autograd refusing the model's tensors
                raise ReverseModeFailed(str(error).splitlines()[0]) from error
            return self.reached(gradient).float()

        def apply(vectors):  # [C, p] -> J vectors, [images * m, p]
            return self.products(vectors, "forward", forward, images)

        def apply_t(outputs):  # [images * m, p] -> J^T outputs, [C, p]
            return self.products(outputs, "reverse", reverse, images)
        try:
            self.found = self.solve(apply, apply_t, self.width)
        except ReverseModeFailed as failure:
            logging.warning("Directions From Image: reverse-mode derivatives failed through this model (%s); forming "
                            "the Jacobian in forward mode instead, a model row per channel", failure)
            self.found = self.solve(apply, None, self.width)
        return latent_image

    def products(self, columns, mode: str, product, images: int):
        """``product`` of each chunk of the rows of ``columns``^T, as columns again: a chunk a model call (each row
        ``images`` model rows), counting the model rows, advancing the bar and stopping on cancel. Where a pass runs
        out of memory its chunk halves; at one shift a call, a reverse pass of one image gives way to forming J in
        forward mode (of several images, that would cost the site's width in rows per image: a one-line error asks
        for fewer), a forward pass to a one-line error."""
        rows, done, start = columns.T, [], 0
        while start < len(rows):
            comfy.model_management.throw_exception_if_processing_interrupted()
            chunk = rows[start:start + self.shifts_per_call(mode, images)]
            try:
                done.append(product(chunk))
            except torch.OutOfMemoryError:
                if len(chunk) == 1 and mode == "reverse" and images == 1:
                    raise ReverseModeFailed("out of memory at 1 row a call") from None
                if len(chunk) == 1:
                    raise torch.OutOfMemoryError(
                        f"latent: Directions From Image ran out of memory at {images} row{'s' * (images > 1)} a call "
                        f"in a {mode} pass ({'one per image' if images > 1 else 'one image'}); use "
                        f"{'fewer images or ' * (images > 1)}a smaller latent, or free the device") from None
                self.chunk[mode] = len(chunk) * images // 2
                logging.info("Directions From Image: out of memory in a %s pass; %d rows a call from now", mode,
                             self.shifts_per_call(mode, images) * images)
                comfy.model_management.soft_empty_cache()
                continue
            start += len(chunk)
            self.model_rows[mode] += len(chunk) * images
            self.progress.advance(len(chunk) * images)
        return torch.cat(done).T

    def shifts_per_call(self, mode: str, images: int) -> int:
        """As many shifts as the mode's row budget holds with every image in the call, at least one."""
        return max(1, self.chunk[mode] // images)

    def reached(self, derivative):
        if derivative is None:
            raise ValueError(f"site: {self.patch.site} did not reach the model's output: is it used by this model, "
                             f"or does an operation on the way (a fused kernel without derivatives) drop the change?")
        return derivative


class RowProgress:
    """The host's bar in model rows. How many blocks of products the iteration takes is known only when it
    stops, so the total is an estimate, raised when passed, and the bar completes when the node does."""

    def __init__(self, estimate: int):
        self.bar, self.done, self.total = comfy.utils.ProgressBar(estimate), 0, estimate

    def advance(self, rows: int):
        self.done += rows
        self.total = max(self.total, self.done + 1)
        self.bar.update_absolute(self.done, self.total)

    def finish(self):
        self.bar.update_absolute(self.total, self.total)


def expected_rows(width: int, count: int) -> int:
    """Model rows a site usually costs: the formed Jacobian's columns, or about four Krylov blocks of forward-
    and reverse-mode products (docs/math.md, section 'Jacobian directions')."""
    return width if width <= EXACT_WIDTH else 8 * (count + OVERSAMPLE)


def in_latent_units(model, tangent):
    """A change of the model's prediction in the LATENT's own units: the linear part of the host's
    process_latent_out (its scale factor; some formats also shift, which a change does not carry)."""
    return model.process_latent_out(tangent) - model.process_latent_out(torch.zeros_like(tangent))


class DirectionsFromImage:
    DESCRIPTION = (
        "Directions for an image: the shifts at a site that change the model's denoised prediction of this image "
        "most, at one point of the schedule (the top right singular vectors of that change's Jacobian, from the "
        "host's own model, by products with the Jacobian in forward and reverse mode, never forming it). Given a "
        "batch, the directions that change all its images' predictions most together (their Jacobians stacked). "
        "With a mask, the change inside the mask counts (localised edits). Gains: the change of the prediction per "
        "unit alpha (root mean square over the images). Costs a few blocks of count + 6 forward-mode and as many "
        "reverse-mode model rows per site and image.")
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
            "latent": ("LATENT", {"tooltip": "An image's clean latent (VAEEncode of a photo, or a sampled image), or a "
                                             "batch: the directions that change all of them most together (each image "
                                             "costs as much as one)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                     "The noise the images are noised with to the chosen point."}),
            "percent": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip":
                        "The point of the schedule, in model time (0 = the noisiest step; at 1, the end, the "
                        "prediction is the image itself and has no directions); where edits of structure start, "
                        "0.2 to 0.4, is a good place."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                    "Guidance of the prediction differentiated (1: the prompt's prediction alone)."}),
            "site": ("STRING", {"default": HSPACE, "tooltip": SITE_TOOLTIP}),
            "count": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "Directions per site."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Where the change counts (resized to the latent): the directions change "
                                         "the masked region most. One mask, or one per image."}),
        }}

    def directions(self, model, positive, negative, latent, seed, percent, cfg, site, count, mask=None):
        checked_latent(model, latent, "latent")
        finite("percent", percent)
        finite("cfg", cfg)
        samples = latent["samples"]
        sites = host.select_layers(host.site_paths(model), site, input_name="site")
        widths = site_widths(model, sites)
        weights = None if mask is None else latent_weights(as_mask_batch(mask), samples.shape)
        if weights is not None and not weights.any():
            raise ValueError("mask: it is empty at the latent's resolution; paint the region the edit should change")
        sampling = host.model_sampling(model)
        # the host marks percent 0 with a huge sigma ("before the schedule"): the noisiest step is sigma_max
        sigmas = torch.tensor([min(float(sampling.percent_to_sigma(percent)), float(sampling.sigma_max)), 0.0])
        progress = RowProgress(len(samples) * sum(expected_rows(widths[s], count) for s in sites))

        def solve(apply, apply_t, width):
            return jacobian_directions(apply, apply_t, width, count, weights, stacked=len(samples))
        found = {}
        for name in sites:
            run = with_jacobian(model, positive, negative, samples, seed, sigmas, cfg, name, widths[name], solve,
                                progress)
            found[name] = SiteDirections(*run.found)
            logging.info("Directions From Image at %s: %d forward-mode and %d reverse-mode model rows", name,
                         run.model_rows["forward"], run.model_rows["reverse"])
        progress.finish()
        params = {"site": site, "percent": percent, "seed": seed, "cfg": cfg, "count": count,
                  "masked": mask is not None, "images": len(samples)}
        return (DirectionSet(sites=found, method="jacobian", params=params, model=host.made_for(model)),)


def site_widths(model, sites) -> dict:
    widths = host.site_widths(model)
    if HSPACE in sites:
        widths[HSPACE] = host.hspace_width(model)
    return widths


def with_jacobian(model, positive, negative, samples, seed: int, sigmas, cfg: float, site: str, width: int, solve,
                  progress) -> JacobianRun:
    """Runs ``solve(apply, apply_t, width)`` on the Jacobian at ``site`` (``width`` wide) of the model's predictions
    for the images ``samples`` [B, ...] noised with ``seed`` to sigmas[0] (stacked, image after image), inside the
    host's guider; the finished run."""
    patch = DerivativeShift(site)
    patched = model.clone()
    host.forward_mode_attention(patched)
    if site_kind(site) == ATTN1:
        patched.set_model_attn1_patch(patch.attention_input)
    elif site_kind(site) == DIT:
        block = host.dit.sites(model)[site]
        host.dit.add_shifts(patched, [(block, patch.transformer_input(block))])
    else:
        patched.set_model_output_block_patch(patch.middle_output)
    run = JacobianRun(patch, width, solve, progress)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    # the reverse products enable grad for themselves
    with torch.inference_mode(False), torch.no_grad(), host.training_kernels():
        guider.sample(comfy.sample.prepare_noise(samples, seed), samples, run, sigmas, seed=seed, disable_pbar=True)
    return run


def latent_weights(mask: torch.Tensor, shape) -> torch.Tensor:
    """A [1 or B, H, W] mask as weights of a [B, C, ...] latent batch's entries, image after image [B * C * h * w]
    (area-resized to the latent grid; a latent cell wholly outside is 0)."""
    if len(mask) not in (1, shape[0]):
        raise ValueError(f"mask: {len(mask)} masks for a latent batch of {shape[0]} images; give one mask, or one "
                         f"per image")
    per_cell = mask_to_tokens(mask, tuple(shape[-2:]))  # [M, h * w], as Apply Direction weighs tokens
    return per_cell.reshape(len(mask), 1, *[1] * (len(shape) - 4), *shape[-2:]).expand(*shape).flatten()


NODE_CLASS_MAPPINGS = {"DirectionsFromImage": DirectionsFromImage}
NODE_DISPLAY_NAME_MAPPINGS = {"DirectionsFromImage": "Directions From Image (Jacobian)"}
