"""DDIM Invert and the DDIM Inversion Sampler: real images back to the noise that reconstructs them."""
import logging

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..directions.inversion import invert
from . import host
from .common import CATEGORY, finite, finite_tensor

DEFAULT_REFINE = 2
MAX_REFINE = 20
MAX_CFG = 30.0
UNCONVERGED = 1e-2  # a residual this large is an error of the same size in the round trip


@torch.no_grad()
def inversion_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None,
                               refine=DEFAULT_REFINE):
    """A k-diffusion-style sampler that walks ascending sigmas (FlipSigmas) upward: the inverse of ddim."""
    extra_args = {} if extra_args is None else extra_args
    finite_tensor("latent_image", x, "latent's values")
    if len(sigmas) > 1 and sigmas[0] > sigmas[-1]:
        raise ValueError("sigmas: inversion walks the schedule upward; put FlipSigmas between the scheduler "
                         "and SamplerCustomAdvanced")

    def denoise(latent, sigma):
        return model(latent, sigma * latent.new_ones([latent.shape[0]]), **extra_args)

    residuals = []

    def report(i, latent, residual):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if residual is not None:
            residuals.append(float(residual.max()))
        if callback is not None:
            callback({"x": latent, "i": i, "sigma": sigmas[i + 1], "sigma_hat": sigmas[i + 1], "denoised": latent})
    inverted = invert(denoise, x, sigmas, refine, report)
    log_residuals(residuals)
    return inverted


def log_residuals(residuals):
    """Each step's fixed-point residual in the log; a warning when one is large enough to show in the image."""
    if not residuals:
        return
    logging.info("DDIM inversion: fixed-point residual per step, lowest sigma first "
                 "(|F(x) - x| / max(|x|, |F(x)|)): %s", " ".join(f"{r:.1e}" for r in residuals))
    worst = max(range(len(residuals)), key=residuals.__getitem__)
    if residuals[worst] > UNCONVERGED:
        logging.warning("DDIM inversion: step %d of %d has not converged (residual %.1e > %.0e): the image will not "
                        "reconstruct exactly; raise refine or steps, or lower cfg", worst + 1, len(residuals),
                        residuals[worst], UNCONVERGED)


def refine_input():
    return ("INT", {"default": DEFAULT_REFINE, "min": 0, "max": MAX_REFINE, "tooltip":
                    "Extra model calls per step, on average, to remove plain DDIM inversion's drift (0 = plain "
                    "DDIM inversion): each step solves its fixed point, the lowest steps, where it converges "
                    "slowest, getting most of the calls. At most 1 + refine calls per step on average over the "
                    "schedule (a low step may take more); fewer once every step has converged. The log lists "
                    "each step's residual."})


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
        return (InversionKSampler(inversion_sampler_function, extra_options={"refine": refine}),)


class InversionKSampler(comfy.samplers.KSAMPLER):
    """The host's KSAMPLER divides flow-model results by 1 - sigma; refuse a schedule that ends at 1."""

    def sample(self, model_wrap, sigmas, *args, **kwargs):
        if host.is_flow(model_wrap.inner_model.model_sampling) and float(sigmas[-1]) >= 1:
            raise ValueError("sigmas: this flow-matching schedule ends at sigma 1, where a SAMPLER's result is "
                             "undefined; use DDIM Invert and its noise output, or stop the schedule below 1")
        return super().sample(model_wrap, sigmas, *args, **kwargs)


class DDIMInvert:
    DESCRIPTION = (
        "Turns a real image's latent (from VAEEncode) into the noise latent that deterministic sampling maps "
        "back to it. Sample the result with KSamplerAdvanced (add_noise: disable) or SamplerCustom (add_noise "
        "off) using the same steps and scheduler; or give the noise output to SamplerCustomAdvanced (needed for "
        "flow-matching models such as SD3 and Flux). Invert with the UNEDITED model and cfg 1; apply edits only "
        "to the model that samples back.")
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    RETURN_TYPES = ("LATENT", "NOISE")
    RETURN_NAMES = ("latent", "noise")
    OUTPUT_TOOLTIPS = (
        "x_T on the host's latent scale, for KSamplerAdvanced with add_noise disabled (eps and v models).",
        "The same x_T as a NOISE for SamplerCustomAdvanced: sampling starts exactly there with any latent of this "
        "size, for every model type.")

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
            "positive": ("CONDITIONING", {"tooltip": "The prompt describing the image, the same one you sample back "
                                                     "with (an empty-prompt CLIPTextEncode will do)."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "Only used when cfg is not 1."}),
        }}

    def invert(self, model, latent, steps, scheduler, cfg, refine, positive, negative=None):
        samples = latent["samples"]
        host.check_invertible(model)
        host.check_latent_fits(model, samples, "latent")
        samples = host.model_latent(model, samples)
        if samples.shape[0] == 0:
            raise ValueError("latent: the batch is empty")
        finite_tensor("latent", samples, "latent's values")
        host.check_conditioning_fits(model, positive, "positive")
        if negative is not None:
            host.check_conditioning_fits(model, negative, "negative")
        if steps < 1:
            raise ValueError(f"steps: expected at least 1, got {steps}")
        if not 0 <= refine <= MAX_REFINE:
            raise ValueError(f"refine: expected 0 to {MAX_REFINE} extra model calls per step, got {refine}")
        if not 0 <= finite("cfg", cfg) <= MAX_CFG:
            raise ValueError(f"cfg: expected 0 to {MAX_CFG} (1 inverts best), got {cfg}")
        if negative is None and cfg != 1:
            raise ValueError(f"negative: cfg {cfg:g} guides away from a negative prompt, and none is connected; "
                             f"connect one (an empty prompt will do) or set cfg to 1")
        if cfg > 1:
            logging.warning("DDIM Invert: cfg %.2f > 1; inversion drifts at high guidance, 1 reconstructs best", cfg)
        sigmas = comfy.samplers.calculate_sigmas(host.model_sampling(model), scheduler, steps).flip(0)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, positive if negative is None else negative)
        guider.set_cfg(cfg)
        progress = comfy.utils.ProgressBar(steps)
        inverted = guider.sample(torch.zeros_like(samples), samples, UnscaledInversion(refine), sigmas, seed=0,
                                 callback=lambda step, x0, x, total: progress.update_absolute(step + 1, total),
                                 disable_pbar=True)
        inverted = inverted.to(comfy.model_management.intermediate_device())
        return ({**latent, "samples": inverted}, InvertedNoise(model, inverted, float(sigmas[-1])))


class UnscaledInversion(comfy.samplers.Sampler):
    """The inversion run inside the host's guider (conditioning, CFG, model loading) on the latent as it
    is: a KSAMPLER would divide the result by 1 - sigma for flow models, which is 0 at sigma 1."""

    def __init__(self, refine):
        self.refine = refine

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        def model(x, sigma, **options):
            return model_wrap(x, sigma, model_options=options["model_options"], seed=options.get("seed"))
        total = len(sigmas) - 1
        return inversion_sampler_function(model, latent_image, sigmas, extra_args, refine=self.refine,
                                          callback=callback and (lambda d: callback(d["i"], d["x"], d["x"], total)))


class InvertedNoise:
    """NOISE for SamplerCustomAdvanced that makes sampling start exactly at the inverted x_T.

    The host starts from its model's noise_scaling(sigma, noise, latent), which every model type
    defines its own way but always as an affine map of the noise; so the noise is solved for
    through that very function, from the latent the sampler is given.
    """

    def __init__(self, model, inverted, sigma: float):
        self.seed, self.patcher, self.model, self.sigma = 0, model, model.model, sigma
        self.start = self.model.process_latent_in(inverted)

    def generate_noise(self, input_latent):
        latent = host.model_latent(self.patcher, input_latent["samples"])
        if latent.shape != self.start.shape:
            raise ValueError(f"noise: the sampler's latent has shape {list(latent.shape)} but the inverted noise "
                             f"{list(self.start.shape)}; give it a latent of the inverted image's size")
        latent = self.model.process_latent_in(latent) if torch.count_nonzero(latent) > 0 else torch.zeros_like(latent)
        return host.noise_for_start(self.patcher, self.start, latent, self.sigma, "noise")


NODE_CLASS_MAPPINGS = {"DDIMInvert": DDIMInvert, "DDIMInversionSampler": DDIMInversionSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"DDIMInvert": "DDIM Invert", "DDIMInversionSampler": "DDIM Inversion Sampler"}
