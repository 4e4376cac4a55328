"""Transformer (DiT) models built from the host's own classes with seeded weights (the host leaves them empty).

The block structure is the real one (double and single blocks, QK-norm, rotary positions, joint
attention with the text tokens), so site names and patch points are the real ones; widths, depths and
heads are scaled down unless ``full_size``.
"""
import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from .unets import seeded_weights

FLUX_DIT = {  # Flux.1 dev as the host detects it (comfy/model_detection.py)
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
TINY_FLUX = {"hidden_size": 32, "num_heads": 2, "axes_dim": [4, 6, 6], "depth": 2, "depth_single_blocks": 2,
             "context_in_dim": 32, "vec_in_dim": 16, "mlp_ratio": 2.0}


def build_flux(seed=0, dtype=torch.float32, full_size=False, **overrides) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around the host's Flux model, weights drawn from ``seed``; ``overrides`` change the config."""
    config = dict(FLUX_DIT, **({} if full_size else TINY_FLUX), **overrides)
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(dtype, None if dtype == torch.float32 else torch.float32)
    model = comfy.model_base.Flux(model_config, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(seeded_weights(model.diffusion_model, seed, dtype))
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())
