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
    """The site's q, k, v, out, QK-norm gains and biases in float32, this patcher's patches merged."""
    def weight(path, name, rows=None, columns=None):
        key = f"diffusion_model.{path}.{name}"
        return read_weight(key_patches, key, device, rows, columns) if key in key_patches else None
    qkv, out = weight(site.linear, "weight", rows=site.qkv_rows), weight(site.out, "weight", columns=site.out_columns)
    bias = weight(site.linear, "bias", rows=site.qkv_rows)
    q, k, v = qkv.chunk(3)
    biases = (None, None, None) if bias is None else bias.chunk(3)
    return AttentionWeights(q, k, v, out, heads=site.heads, q_norm=weight(site.norm, "query_norm.scale"),
                            k_norm=weight(site.norm, "key_norm.scale"), q_bias=biases[0], k_bias=biases[1],
                            v_bias=biases[2])


@dataclass(frozen=True)
class ModelCall:
    """What a shift needs to know of the model call it runs in."""
    options: dict  # the call's transformer_options (sigmas, cond_or_uncond, ...)
    grid: tuple  # the latent's image tokens, (rows, columns)
    text_tokens: int  # tokens before the image tokens in a joint sequence


class ShiftsDuringCalls:
    """DIFFUSION_MODEL wrapper that, for the duration of each model call, hooks the sites' linears so their outputs
    also get ``shift(call, x, out, image_of)``'s change, and removes the hooks when the call ends.

    Only a clone carrying this wrapper ever runs with the hooks, weights are never touched (the host still loads,
    casts and LoRA-patches them as usual), and chained edits nest. ``image_of(vector)`` is the linear's image of a
    vector (the linear on the vector and on zero, differenced), so shifts stay exact under any patching.
    """

    def __init__(self, shifts: list):
        self.shifts = shifts  # [(DitSite, shift)]

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timestep, context, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None:
            options = next((a for a in args if isinstance(a, dict) and "sigmas" in a), {})
        model = executor.class_obj
        patch = model.patch_size
        call = ModelCall(options, ((x.shape[-2] + patch // 2) // patch, (x.shape[-1] + patch // 2) // patch),
                         context.shape[1] if context is not None else 0)
        handles = [model.get_submodule(site.linear).register_forward_hook(_OutputShift(call, shift))
                   for site, shift in self.shifts]
        try:
            return executor(x, timestep, context, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


class _OutputShift:
    """One linear's forward hook for one call; the linear's own calls made to map a vector pass through."""

    def __init__(self, call: ModelCall, shift):
        self.call, self.shift, self.mapping = call, shift, False

    def __call__(self, module, args, out):
        if self.mapping:
            return None
        x = args[0]

        def image_of(vector):
            self.mapping = True
            try:
                mapped = module(torch.stack([vector.to(x.dtype), torch.zeros_like(vector, dtype=x.dtype)]))
            finally:
                self.mapping = False
            return mapped[0] - mapped[1]
        return self.shift(self.call, x, out, image_of)


def add_shifts(patcher, shifts: list) -> None:
    """Put ``shifts`` [(DitSite, shift)] on ``patcher`` (a clone): see :class:`ShiftsDuringCalls`."""
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 ShiftsDuringCalls(shifts))


def image_token_range(site: DitSite, call: ModelCall) -> slice:
    """The latent's image tokens in the site's linear input (reference-image tokens that follow stay out)."""
    start = call.text_tokens if site.joint else 0
    return slice(start, start + call.grid[0] * call.grid[1])
