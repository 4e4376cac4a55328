"""Transformer (DiT) models as the pack sees them: their image-attention sites, weights and patch points.

Flux, Flux.2 and Chroma (comfy/ldm/flux, comfy/ldm/chroma) have two kinds of block, each with
QK RMS-norm and rotary positions:
- a double block's image attention, 'double_blocks.3.img_attn': q, k and v from ``img_attn.qkv``
  (image tokens only; the text stream has its own weights), out ``img_attn.proj``;
- a single block's attention, 'single_blocks.10.attn': q, k and v are the first 3 x hidden rows
  of ``linear1``, whose input holds the text tokens and then the image tokens, and the attention
  output enters the first hidden columns of ``linear2`` (the rest belong to the MLP).

A site's tokens are the image tokens of the linear's input (the block's modulated norm output).
Apply Direction moves them by changing only the q, k and v rows of that linear's output, which is
exact (the map is linear) and leaves the MLP and the text tokens untouched.
"""
import contextvars
import copy
from dataclasses import dataclass

import torch

import comfy.patcher_extension

from ...directions.attention import AttentionWeights

FAMILIES = "Flux, Flux.2 and Chroma"
GROUPS = {"double": "double_blocks", "single": "single_blocks"}
WRAPPER_KEY = "semantic_directions"


@dataclass(frozen=True)
class DitSite:
    """Where one site's weights live (module paths under the diffusion model) and how its linear's input is laid out."""
    linear: str  # the linear fed the attention input
    qkv_rows: int  # its first rows are q, k and v (3 x inner)
    out: str  # the output projection
    out_columns: int  # its first columns take the attention output
    norm: str  # the QK-norm module (query_norm.scale, key_norm.scale)
    heads: int
    width: int
    joint: bool  # the linear's input holds the text tokens first, then the image tokens


def sites(patcher) -> dict:
    """Every image-attention site of a Flux-like model by path, double blocks then single blocks; {} for others."""
    model = getattr(patcher.model, "diffusion_model", None)
    found = {}
    for i, block in enumerate(getattr(model, "double_blocks", None) or []):
        attention = getattr(block, "img_attn", None)
        if attention is None or not hasattr(attention, "qkv") or not hasattr(attention, "norm"):
            continue
        inner = attention.proj.weight.shape[1]
        found[f"double_blocks.{i}.img_attn"] = DitSite(
            f"double_blocks.{i}.img_attn.qkv", 3 * inner, f"double_blocks.{i}.img_attn.proj", inner,
            f"double_blocks.{i}.img_attn.norm", block.num_heads, attention.qkv.weight.shape[1], joint=False)
    for i, block in enumerate(getattr(model, "single_blocks", None) or []):
        if not all(hasattr(block, name) for name in ("linear1", "linear2", "norm", "hidden_size")):
            continue
        found[f"single_blocks.{i}.attn"] = DitSite(
            f"single_blocks.{i}.linear1", 3 * block.hidden_size, f"single_blocks.{i}.linear2", block.hidden_size,
            f"single_blocks.{i}.norm", block.num_heads, block.linear1.weight.shape[1], joint=True)
    return found


def read_weights(key_patches: dict, site: DitSite, device, read_weight) -> AttentionWeights:
    """The site's q, k, v, out, QK-norm gains and q/k biases in float32, this patcher's patches merged."""
    def weight(path, name):
        key = f"diffusion_model.{path}.{name}"
        return read_weight(key_patches, key, device) if key in key_patches else None
    qkv, out = weight(site.linear, "weight")[:site.qkv_rows], weight(site.out, "weight")[:, :site.out_columns]
    bias = weight(site.linear, "bias")
    q, k, v = qkv.chunk(3)
    biases = (None, None, None) if bias is None else bias[:site.qkv_rows].chunk(3)
    return AttentionWeights(q, k, v, out, heads=site.heads, q_norm=weight(site.norm, "query_norm.scale"),
                            k_norm=weight(site.norm, "key_norm.scale"), q_bias=biases[0], k_bias=biases[1],
                            v_bias=biases[2])


@dataclass(frozen=True)
class ModelCall:
    """What a shifted linear needs to know of the model call it runs in."""
    options: dict  # the call's transformer_options (sigmas, cond_or_uncond, ...)
    grid: tuple  # the latent's image tokens, (rows, columns)
    text_tokens: int  # tokens before the image tokens in a joint sequence


_CALL = contextvars.ContextVar("semantic_directions_model_call", default=None)


class CallRecorder:
    """DIFFUSION_MODEL wrapper: makes the call's options, token grid and text length visible to the shifted
    linears for the duration of the call (they see only their input)."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timestep, context, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None:
            options = next((a for a in args if isinstance(a, dict) and "sigmas" in a), {})
        patch = executor.class_obj.patch_size
        grid = ((x.shape[-2] + patch // 2) // patch, (x.shape[-1] + patch // 2) // patch)
        token = _CALL.set(ModelCall(options, grid, context.shape[1] if context is not None else 0))
        try:
            return executor(x, timestep, context, *args, **kwargs)
        finally:
            _CALL.reset(token)


def current_call() -> ModelCall | None:
    return _CALL.get()


def shift_linear(patcher, site: DitSite, shift) -> None:
    """Object-patch the site's linear on ``patcher`` (a clone) so its output also gets ``shift(call, x, out,
    image_of)``'s change; earlier shifts on the same linear stay. The patch is a shallow copy of the host's
    module sharing its parameters, so the host still loads, casts and LoRA-patches the weights under their
    own names; the shifts see the image of a vector under the linear through ``image_of``."""
    name = f"diffusion_model.{site.linear}"
    current = patcher.get_model_object(name)
    shifted = copy.copy(current)
    shifts = (*getattr(current, "semantic_directions_shifts", ()), shift)
    forward = type(current).forward

    def shifted_forward(x, *args, **kwargs):
        out = forward(shifted, x, *args, **kwargs)
        call = _CALL.get()
        if call is None:
            return out

        def image_of(vector):
            pair = torch.stack([vector.to(x.dtype), torch.zeros_like(vector, dtype=x.dtype)])
            mapped = forward(shifted, pair)
            return mapped[0] - mapped[1]
        for each in shifts:
            out = each(call, x, out, image_of)
        return out
    shifted.forward, shifted.semantic_directions_shifts = shifted_forward, shifts
    patcher.add_object_patch(name, shifted)
    if not patcher.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, CallRecorder())


def image_token_range(site: DitSite, call: ModelCall) -> slice:
    """The latent's image tokens in the site's linear input (reference-image tokens that follow stay out)."""
    start = call.text_tokens if site.joint else 0
    return slice(start, start + call.grid[0] * call.grid[1])

