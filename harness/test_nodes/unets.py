"""UNets built from the host's own classes with deterministic weights (the host leaves them empty).

The block structure is exactly SD1.5's or SDXL's, so layer names, attention sites and patch points
are the real ones; only the width (and for tests the context width and heads) is scaled down.
"""
import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.taesd.taesd

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_heads": -1, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
FAMILIES = {"sd15": (comfy.supported_models.SD15, SD15_UNET, comfy.model_base.BaseModel),
            "sdxl": (comfy.supported_models.SDXL, SDXL_UNET, comfy.model_base.SDXL)}


def build_unet(family="sd15", model_channels=32, context_dim=32, num_heads=4, seed=0,
               dtype=torch.float32, full_size=False, model_type="eps", depths=None,
               compute_dtype=torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around the host's model class of the given family, weights drawn from ``seed``.

    ``full_size`` keeps the real widths, context and heads (for benchmarks). ``model_type``
    ('eps', 'v_prediction' or 'flow') picks the host's prediction type and sampling schedule.
    ``depths`` replaces the family's block counts (num_res_blocks, channel_mult, transformer depths).
    ``dtype`` stores the weights; the model computes in ``compute_dtype``: float32 by default, as the host runs
    low-precision checkpoints on a CPU, or the storage dtype, as it runs them on a GPU.
    """
    config_class, unet, model_class = FAMILIES[family]
    unet = dict(unet, dtype=dtype, **(depths or {}))
    if not full_size:
        unet["model_channels"], unet["context_dim"] = model_channels, context_dim
        if unet["adm_in_channels"]:  # SDXL: CLIP-G's pooled vector (half the context) and 6 size embeddings
            unet["adm_in_channels"] = context_dim // 2 + 6 * 256
        if unet["num_heads"] > 0:
            unet["num_heads"] = num_heads
        else:
            unet["num_head_channels"] = max(model_channels // num_heads, 1)
    config = config_class(unet)
    config.unet_config.update({k: unet[k] for k in ("num_heads", "num_head_channels")})
    config.set_inference_dtype(dtype, None if compute_dtype == dtype else compute_dtype)
    model_type = comfy.model_base.ModelType[model_type.upper()]
    model = model_class(config, model_type=model_type, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(seeded_weights(model.diffusion_model, seed, dtype))
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def seeded_weights(module: torch.nn.Module, seed: int, dtype) -> dict:
    """Fan-in scaled normal weights, unit norm gains, small biases: the same for a seed anywhere."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.ndim >= 2:
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5
        elif name.endswith(("weight", "scale")):  # norm gains (RMS norms call theirs 'scale')
            value = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            value = 0.02 * torch.randn(tensor.shape, generator=generator)
        weights[name] = value.to(dtype)
    return weights


def build_vae(seed=0, latent_channels=4) -> comfy.sd.VAE:
    """A TAESD-architecture VAE (4 latent channels, or Flux's and SD3's 16 as taef1; 8x downscale) with seeded
    weights, loaded by the host."""
    template = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    weights = seeded_weights(template, seed, torch.float32)
    weights.update(vae_scale=torch.tensor(1.0), vae_shift=torch.tensor(0.0))
    return comfy.sd.VAE(sd=weights)


class GaussianPriorDenoiser:
    """A unet function wrapper that makes the tiny UNet behave like a trained denoiser.

    The prediction becomes the exact posterior mean for data drawn from N(0, data_std^2), plus
    ``unet_gain`` times the real UNet's own correction. Random weights alone predict noise that
    has nothing to do with the input (and GroupNorm gives them a huge Jacobian on small inputs),
    so inversion, which needs a denoiser that tracks its input, is tested in this regime.
    """

    def __init__(self, flow: bool, data_std: float = 1.0, unet_gain: float = 0.05):
        self.flow, self.variance, self.unet_gain = flow, data_std ** 2, unet_gain

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args):
        x, sigma = args["input"], args["timestep"].reshape(-1, *([1] * (args["input"].ndim - 1)))
        denoised = apply_model(x, args["timestep"], **args["c"])
        if self.flow:  # x = (1 - sigma) x0 + sigma eps
            keep = 1 - sigma
            optimal = x * keep * self.variance / (keep ** 2 * self.variance + sigma ** 2)
        else:  # x = x0 + sigma eps (eps- and v-prediction alike)
            optimal = x * self.variance / (self.variance + sigma ** 2)
        return optimal + self.unet_gain * (denoised - x)


def with_gaussian_prior(patcher, **options):
    import comfy.model_sampling
    flow = isinstance(patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    wrapped = patcher.clone()
    wrapped.set_model_unet_function_wrapper(GaussianPriorDenoiser(flow, **options))
    return wrapped


TINY_TEXT_ENCODER = {"intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}  # SDXL reads layer -2
# Text encoders at the tiny UNet's context width 32: SD1.5's CLIP-L alone, SDXL's CLIP-L and CLIP-G
# side by side (16 + 16); CLIP-G's pooled vector (16) feeds the tiny SDXL UNet's class embedding.
TINY_CLIP = {
    "sd15": (comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer,
             {"clip_l_model_config": dict(TINY_TEXT_ENCODER, hidden_size=32)}),
    "sdxl": (comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer,
             {"clip_l_model_config": dict(TINY_TEXT_ENCODER, hidden_size=16),
              "clip_g_model_config": dict(TINY_TEXT_ENCODER, hidden_size=16)}),
}


class TextEncoderParts:
    """What comfy.sd.CLIP builds from: a family's text encoder class and tokenizer (the real vocabularies)."""

    def __init__(self, clip, tokenizer):
        self.params, self.clip, self.tokenizer = {}, clip, tokenizer


def build_clip(family="sd15", seed=0, full_size=False, dtype=torch.float32) -> comfy.sd.CLIP:
    """The family's CLIP text encoders and tokenizers at the tiny widths above, seeded weights.

    The widths come in through the host's own per-encoder config overrides (``clip_l_model_config``);
    ``full_size`` keeps the real ones (CLIP-L: 12 layers of 768, 123 M parameters).
    """
    clip_class, tokenizer, configs = TINY_CLIP[family]
    options = {"dtype": dtype} if full_size else {**configs, "dtype": dtype}
    clip = comfy.sd.CLIP(TextEncoderParts(clip_class, tokenizer), model_options=options)
    model = clip.cond_stage_model
    model.load_state_dict(seeded_weights(model, seed, dtype), strict=False)
    return clip


# SD1.5's widths (320 channels, context 768, 8 heads) in two levels of one res block and one transformer each:
# the host reads block counts from the weights and matches the family on widths, so it detects SD1.5.
SMALL_SD15_DEPTHS = {"num_res_blocks": [1, 1], "channel_mult": [1, 1], "transformer_depth": [1, 1],
                     "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1]}


def write_sd15_checkpoint(path, seed=0):
    """A checkpoint file (fp16, seeded weights, about 340 MB) written by the host's own comfy.sd.save_checkpoint,
    which CheckpointLoaderSimple loads as SD1.5 with MODEL, CLIP and VAE: the UNet of SMALL_SD15_DEPTHS,
    CLIP-L at full size (the host builds SD1.5's text encoder from a fixed config, so every weight must be
    there), and the TAESD-shaped VAE (recognised by its keys, 8x downscale, 4 channels)."""
    unet = build_unet("sd15", seed=seed, dtype=torch.float16, full_size=True, depths=SMALL_SD15_DEPTHS)
    comfy.sd.save_checkpoint(str(path), unet, build_clip("sd15", seed, full_size=True, dtype=torch.float16),
                             build_vae(seed))
    return path
