"""Asyrp Sampler: deterministic DDIM with the asymmetric step inside the edit range of the model's patches."""
import torch

import comfy.k_diffusion.sampling
import comfy.samplers

from ..directions.asyrp import sample_asyrp
from . import host
from .apply import edits_on
from .common import CATEGORY, finite, finite_tensor


def _with_options(extra_args: dict, **values) -> dict:
    """``extra_args`` with ``values`` added to the transformer_options its patches receive."""
    options = dict(extra_args.get("model_options", {}))
    options["transformer_options"] = {**options.get("transformer_options", {}), **values}
    return {**extra_args, "model_options": options}


@torch.no_grad()
def asyrp_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=0.0, boost_start_percent=1.0):
    """The host-facing sampler: ``model(x, sigma, **extra_args)`` returns x0 as in k-diffusion."""
    finite_tensor("latent_image", x, "latent's values")
    extra_args = _with_options({} if extra_args is None else extra_args, **{host.SAMPLER: host.ASYRP})
    edits = edits_on(extra_args.get("model_options", {}))
    sampling = host.model_sampling(model.inner_model.model_patcher)
    flow = host.is_flow(sampling)
    if eta and flow:
        raise ValueError("boost_eta: noise boosting needs a noise-prediction model; flow-matching models "
                         "(SD3, Flux) take boost_eta 0")

    def denoise(latent, sigma):
        return model(latent, sigma * latent.new_ones([latent.shape[0]]), **extra_args)

    def denoise_pair(latent, sigma):
        if extra_args.get("denoise_mask") is not None:  # the host's inpainting blend needs the batch as it is
            return denoise(latent, sigma), model(latent, sigma * latent.new_ones([latent.shape[0]]),
                                                 **_with_options(extra_args, **{host.UNEDITED: "all"}))
        doubled = torch.cat([latent, latent])
        both = model(doubled, sigma * doubled.new_ones([doubled.shape[0]]),
                     **_with_options(extra_args, **{host.UNEDITED: "copies"}))
        return both.chunk(2)

    noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
    return sample_asyrp(denoise, denoise_pair, x, sigmas, lambda s: any(e.active_at(s) for e in edits),
                        eta=eta, boost_below=sampling.percent_to_sigma(boost_start_percent),
                        noise_sampler=noise_sampler, callback=callback, flow=flow, split=host.ancestral_split)


class AsyrpSampler:
    DESCRIPTION = (
        "Deterministic DDIM that, inside the edit range of the Apply Direction patches on the model, takes "
        "Asyrp's asymmetric step: x0 from the edited model, the noise direction from the unedited one (both "
        "in one batched UNet call). Use it with SamplerCustom or SamplerCustomAdvanced; h-space edits need it, "
        "since shifting both halves of a plain step cancels. Optional late noise (boost_eta) refines quality.")
    CATEGORY = CATEGORY
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "boost_eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                          "Noise added in the late interval (Asyrp's quality boost): 0 keeps sampling "
                          "deterministic, 1 is DDPM-like."}),
            "boost_start_percent": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                    "Model time at which the late noisy interval begins (1 = never)."}),
        }}

    def get_sampler(self, boost_eta, boost_start_percent):
        finite("boost_eta", boost_eta)
        finite("boost_start_percent", boost_start_percent)
        return (comfy.samplers.KSAMPLER(asyrp_sampler_function, extra_options={
            "eta": boost_eta, "boost_start_percent": boost_start_percent}),)


NODE_CLASS_MAPPINGS = {"AsyrpSampler": AsyrpSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"AsyrpSampler": "Asyrp Sampler"}
