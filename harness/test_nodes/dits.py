"""Transformer (DiT) models built from the host's own classes with seeded weights (the host leaves them empty).

The block structure is the real one (double and single blocks, QK-norm, rotary positions, joint
attention with the text tokens), so site names and patch points are the real ones; widths, depths and
heads are scaled down unless ``full_size``.
"""
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

from .unets import TextEncoderParts, seeded_weights

FLUX_DIT = {  # Flux.1 dev as the host detects it (comfy/model_detection.py)
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
FLUX2_DIT = {  # Flux.2: shared modulation, SwiGLU MLPs, no biases, 128 latent channels, patch 1
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 15360,
    "hidden_size": 6144, "mlp_ratio": 3.0, "num_heads": 48, "depth": 8, "depth_single_blocks": 48,
    "axes_dim": [32, 32, 32, 32], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
    "ref_index_scale": 10.0,
}
CHROMA_DIT = {  # Chroma: Flux's blocks without per-block modulation, which a distilled approximator gives
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096, "hidden_size": 3072,
    "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
    "n_layers": 5,
}
SD35_DIT = {  # SD3.5 Large as the host detects it: 38 joint blocks of width 64 x 38, RMS-normed q and k
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 38, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
    "pos_embed_max_size": 192, "num_patches": 36864, "qk_norm": "rms", "pos_embed_scaling_factor": None,
}
TINY_SD3 = {  # two joint blocks of width 128 (2 heads of 64), the first with SD3.5 Medium's second image attention
    "depth": 2, "adm_in_channels": 16, "pos_embed_max_size": 16, "num_patches": 256, "x_block_self_attn_layers": [0],
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
}
QWEN_DIT = {  # Qwen-Image as the host builds it: 60 blocks of 24 heads of 128, Qwen2.5-VL's 3584-wide tokens
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56),
}
TINY_QWEN = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
             "axes_dims_rope": (4, 6, 6)}
TINY = {"hidden_size": 32, "num_heads": 2, "axes_dim": [4, 6, 6], "depth": 2, "depth_single_blocks": 2,
        "context_in_dim": 32, "mlp_ratio": 2.0}
FAMILIES = {
    "flux": (comfy.supported_models.Flux, FLUX_DIT, {**TINY, "vec_in_dim": 16}),
    "flux2": (comfy.supported_models.Flux2, FLUX2_DIT, {**TINY, "axes_dim": [4, 4, 4, 4]}),
    "chroma": (comfy.supported_models.Chroma, CHROMA_DIT, {**TINY, "out_dim": 32, "hidden_dim": 32, "n_layers": 2}),
    "sd3": (comfy.supported_models.SD3, SD35_DIT, TINY_SD3),
    "qwen": (comfy.supported_models.QwenImage, QWEN_DIT, TINY_QWEN),
}


def build_dit(family="flux", seed=0, dtype=torch.float32, full_size=False, compute_dtype=torch.float32, **overrides):
    """A ModelPatcher around the host's model of ``family`` (flux, flux2, chroma, sd3, qwen), weights drawn from
    ``seed``, stored in ``dtype`` and computed in ``compute_dtype`` (see unets.build_unet);
    ``overrides`` change the config. Tiny models keep the family's latent channels and patch size."""
    config_class, full, tiny = FAMILIES[family]
    model_config = config_class({**full, **({} if full_size else tiny), **overrides})
    model_config.set_inference_dtype(dtype, None if compute_dtype == dtype else compute_dtype)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(seeded_weights(model.diffusion_model, seed, dtype))
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def build_flux(seed=0, dtype=torch.float32, full_size=False, **overrides):
    return build_dit("flux", seed, dtype, full_size, **overrides)


TINY_FLUX_TEXT = {  # CLIP-L's pooled vector feeds vec_in (16 wide), T5's tokens feed txt_in (32 wide)
    "clip_l_model_config": {"intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                            "hidden_size": 16},
    "t5xxl_model_config": {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2},
}


def build_flux_clip(seed=0) -> comfy.sd.CLIP:
    """Flux's text encoders (CLIP-L and T5-XXL, the real tokenizers) at the tiny Flux's widths, seeded weights, as
    DualCLIPLoader's type 'flux' builds them."""
    import comfy.text_encoders.flux
    clip = comfy.sd.CLIP(TextEncoderParts(comfy.text_encoders.flux.flux_clip(), comfy.text_encoders.flux.FluxTokenizer),
                         model_options=TINY_FLUX_TEXT)
    clip.cond_stage_model.load_state_dict(seeded_weights(clip.cond_stage_model, seed, torch.float32), strict=False)
    return clip

