"""DDIM Invert and the DDIM Inversion Sampler: real images back to the noise that reconstructs them."""
import logging

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

from ..directions.inversion import invert
from .common import CATEGORY

DEFAULT_REFINE = 2
MAX_REFINE = 20
MAX_CFG = 30.0


@torch.no_grad()
def inversion_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None,
                               refine=DEFAULT_REFINE):
    """A k-diffusion-style sampler that walks ascending sigmas (FlipSigmas) upward: the inverse of ddim."""
    extra_args = {} if extra_args is None else extra_args
    if len(sigmas) > 1 and sigmas[0] > sigmas[-1]:
        raise ValueError("sigmas: inversion walks the schedule upward; put FlipSigmas between the scheduler "
                         "and SamplerCustomAdvanced")

    def denoise(latent, sigma):
        return model(latent, sigma * latent.new_ones([latent.shape[0]]), **extra_args)

    def report(i, latent):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback({"x": latent, "i": i, "sigma": sigmas[i + 1], "sigma_hat": sigmas[i + 1], "denoised": latent})
    return invert(denoise, x, sigmas, refine, report)


def refine_input():
    return ("INT", {"default": DEFAULT_REFINE, "min": 0, "max": MAX_REFINE, "tooltip":
                    "Fixed-point iterations per step: each re-evaluates the model at the new point and removes "
                    "most of plain DDIM inversion's drift (0 = plain DDIM inversion). Costs 1 + refine model "
                    "calls per step."})


class DDIMInversionSampler:
    DESCRIPTION = ("The inverse of the ddim sampler, for SamplerCustomAdvanced with a flipped schedule "
                   "(scheduler -> FlipSigmas): walks the sigmas upward from the image's latent to its noise. "
                   "Sample back with the same, unflipped schedule and add_noise off.")
    CATEGORY = CATEGORY
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER that inverts; give it ascending sigmas.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"refine": refine_input()}}

    def get_sampler(self, refine):
        return (comfy.samplers.KSAMPLER(inversion_sampler_function, extra_options={"refine": refine}),)


class DDIMInvert:
    DESCRIPTION = (
        "Turns a real image's latent (from VAEEncode) into the noise latent that deterministic sampling maps "
        "back to it. Sample the result with KSamplerAdvanced (add_noise: disable) or SamplerCustom (add_noise "
        "off) using the same steps and scheduler. Invert with the UNEDITED model and cfg 1; apply edits only to "
        "the model that samples back.")
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The noise latent x_T on the host's scale, for sampling back with add_noise disabled.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The unedited model (patches on it act during inversion)."}),
            "latent": ("LATENT", {"tooltip": "The image's latent, e.g. from VAEEncode."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip":
                      "Use the same number when sampling back."}),
            "scheduler": (comfy.samplers.SCHEDULER_NAMES, {"default": "normal", "tooltip":
                          "Use the same scheduler when sampling back."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_CFG, "step": 0.1, "tooltip":
                    "Guidance during inversion. 1 reconstructs best; above about 2 inversion drifts."}),
            "refine": refine_input(),
        }, "optional": {
            "positive": ("CONDITIONING", {"tooltip": "The prompt describing the image (empty if not connected)."}),
            "negative": ("CONDITIONING", {"tooltip": "Only used when cfg is not 1."}),
        }}

    def invert(self, model, latent, steps, scheduler, cfg, refine, positive=None, negative=None):
        samples = latent["samples"]
        if samples.ndim not in (4, 5):
            raise ValueError(f"latent: expected a 4-D (or 5-D video) latent, got shape {list(samples.shape)}")
        if samples.shape[0] == 0:
            raise ValueError("latent: the batch is empty")
        if steps < 1 or not 0 <= refine <= MAX_REFINE or not 0 <= cfg <= MAX_CFG:
            raise ValueError(f"steps must be at least 1, refine 0 to {MAX_REFINE} and cfg 0 to {MAX_CFG} "
                             f"(got {steps}, {refine}, {cfg})")
        if cfg > 1:
            logging.warning("DDIM Invert: cfg %.2f > 1; inversion drifts at high guidance, 1 reconstructs best", cfg)
        sampling = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps).flip(0)
        if isinstance(sampling, comfy.model_sampling.CONST) and sigmas[-1] >= 1:
            raise ValueError(f"scheduler: {scheduler} starts this flow-matching model at sigma 1, where a latent "
                             f"cannot carry the inverted noise for add_noise-disabled sampling; use the DDIM "
                             f"Inversion Sampler with a schedule that stops below 1")
        if positive is None:
            positive = zero_conditioning(model)
        negative = positive if negative is None else negative
        progress = comfy.utils.ProgressBar(steps)
        inverted = comfy.sample.sample_custom(
            model, torch.zeros_like(samples), cfg, DDIMInversionSampler().get_sampler(refine)[0], sigmas,
            positive, negative, samples, callback=lambda step, x0, x, total: progress.update_absolute(step + 1, total),
            disable_pbar=True, seed=0)
        return ({**latent, "samples": inverted},)


def zero_conditioning(model):
    """An empty prompt's stand-in: zero text features of the model's context width."""
    unet_config = model.model.model_config.unet_config
    context_dim = unet_config.get("context_dim")
    if context_dim is None:
        raise ValueError("positive: this model needs a CONDITIONING to invert with; connect an empty-prompt "
                         "CLIPTextEncode")
    extra = {}
    if model.model.adm_channels:
        extra["pooled_output"] = torch.zeros(1, max(model.model.adm_channels - 6 * 256, 1))
    return [[torch.zeros(1, 77, context_dim), extra]]


NODE_CLASS_MAPPINGS = {"DDIMInvert": DDIMInvert, "DDIMInversionSampler": DDIMInversionSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"DDIMInvert": "DDIM Invert", "DDIMInversionSampler": "DDIM Inversion Sampler"}
