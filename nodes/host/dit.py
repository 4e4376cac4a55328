"""Transformer (DiT) models as the pack sees them: their image-attention sites, weights and patch points.

Flux, Flux.2 and Chroma (comfy/ldm/flux, comfy/ldm/chroma) have two kinds of block, each with
QK RMS-norm and rotary positions:
- a double block's image attention, 'double_blocks.3.img_attn': q, k and v from ``img_attn.qkv``
  (image tokens only; the text stream has its own weights), out ``img_attn.proj``;
- a single block's attention, 'single_blocks.10.attn': q, k and v are the first 3 x hidden rows
  of ``linear1``, whose input holds the text tokens and then the image tokens, and the attention
  output enters the first hidden columns of ``linear2`` (the rest belong to the MLP).

SD3 and SD3.5 (comfy/ldm/modules/diffusionmodules/mmdit.py) have joint blocks whose image stream's
attention, 'joint_blocks.5.x_block.attn', takes q, k and v from ``attn.qkv`` (image tokens only)
and gives its output to ``attn.proj``, with RMS-norm of q and k (SD3.5) or none (SD3) and no
rotary positions; SD3.5 Medium's blocks add a second image-only attention, '...x_block.attn2'.

Qwen-Image (comfy/ldm/qwen_image) has one kind of block, 'transformer_blocks.7.attn': q, k and v from
separate ``attn.to_q``, ``to_k``, ``to_v`` (image tokens only), out ``attn.to_out.0``, RMS-normed q and k
and rotary positions.

A site's tokens are the image tokens of the linear's input (the block's modulated norm output).
Apply Direction moves them by changing only the q, k and v rows of that linear's output, which is
exact (the map is linear) and leaves the MLP and the text tokens untouched.
"""
import dataclasses
import weakref
from dataclasses import dataclass

import torch

import comfy.patcher_extension

from ...directions.attention import AttentionWeights

FAMILIES = "Flux, Flux.2, Chroma, SD3 and Qwen-Image"
GROUPS = {"double": "double_blocks", "single": "single_blocks", "joint": "joint_blocks",
          "transformer": "transformer_blocks"}
WRAPPER_KEY = "semantic_directions"
WRAPPER_TYPES = {"diffusion_model": comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                 "apply_model": comfy.patcher_extension.WrappersMP.APPLY_MODEL}  # a site's call_wrapper -> the host's


@dataclass(frozen=True)
class DitSite:
    """Where one site's weights live (paths under the diffusion model) and how its linears' input is laid out."""
    linears: tuple  # ((path, rows), ...): the linears fed the attention input, and how many of their first output
    # rows are q, k and v: one fused linear ((qkv, 3 x inner),) or three ((to_q, inner), (to_k, ...), (to_v, ...))
    out: str  # the output projection
    out_columns: int  # its first columns take the attention output
    q_norm: str | None  # the gains of the queries' RMS norm, if any
    k_norm: str | None
    heads: int
    width: int
    joint: bool  # the linear's input holds the text tokens first, then the image tokens
    call_wrapper: str = "diffusion_model"  # the host wrapper that sees each model call (WrappersMP)


def sites(patcher) -> dict:
    """Every image-attention site of a Flux-like or SD3 model by path, in block order; {} for other models."""
    model = getattr(patcher.model, "diffusion_model", None)
    found = {}
    for i, block in enumerate(getattr(model, "double_blocks", None) or []):
        attention = getattr(block, "img_attn", None)
        if attention is None or not hasattr(attention, "qkv") or not hasattr(attention, "norm"):
            continue
        inner, norm = attention.proj.weight.shape[1], f"double_blocks.{i}.img_attn.norm"
        found[f"double_blocks.{i}.img_attn"] = DitSite(
            ((f"double_blocks.{i}.img_attn.qkv", 3 * inner),), f"double_blocks.{i}.img_attn.proj", inner,
            f"{norm}.query_norm.scale", f"{norm}.key_norm.scale", block.num_heads, attention.qkv.weight.shape[1],
            joint=False)
    for i, block in enumerate(getattr(model, "single_blocks", None) or []):
        if not all(hasattr(block, name) for name in ("linear1", "linear2", "norm", "hidden_size")):
            continue
        norm = f"single_blocks.{i}.norm"
        found[f"single_blocks.{i}.attn"] = DitSite(
            ((f"single_blocks.{i}.linear1", 3 * block.hidden_size),), f"single_blocks.{i}.linear2", block.hidden_size,
            f"{norm}.query_norm.scale", f"{norm}.key_norm.scale", block.num_heads, block.linear1.weight.shape[1],
            joint=True)
    for i, block in enumerate(getattr(model, "joint_blocks", None) or []):
        for name in ("attn", "attn2"):
            attention = getattr(getattr(block, "x_block", None), name, None)
            if attention is None or not hasattr(attention, "qkv") or getattr(attention, "pre_only", True):
                continue
            path = f"joint_blocks.{i}.x_block.{name}"
            norms = [f"{path}.{norm}.weight" if _rms_norm(getattr(attention, norm)) else None
                     for norm in ("ln_q", "ln_k")]
            found[path] = DitSite(((f"{path}.qkv", attention.qkv.weight.shape[0]),), f"{path}.proj",
                                  attention.proj.weight.shape[1], *norms, attention.num_heads,
                                  attention.qkv.weight.shape[1], joint=False, call_wrapper="apply_model")
    for i, block in enumerate(getattr(model, "transformer_blocks", None) or []):
        attention = getattr(block, "attn", None)
        if not all(hasattr(attention, name) for name in ("to_q", "to_k", "to_v", "to_out", "norm_q", "add_q_proj")):
            continue
        path = f"transformer_blocks.{i}.attn"
        found[path] = DitSite(tuple((f"{path}.{name}", getattr(attention, name).weight.shape[0])
                                    for name in ("to_q", "to_k", "to_v")), f"{path}.to_out.0",
                              attention.to_out[0].weight.shape[1], f"{path}.norm_q.weight", f"{path}.norm_k.weight",
                              attention.heads, attention.to_q.weight.shape[1], joint=False)
    return found


def _rms_norm(module) -> bool:
    """SD3's q and k norms: an RMS norm with gains (SD3.5), none (SD3); a LayerNorm is refused by name."""
    kind = type(module).__name__
    if kind == "Identity":
        return False
    if kind == "RMSNorm" and getattr(module, "weight", None) is not None:
        return True
    raise ValueError(f"model: its attention normalises queries and keys with {kind}, which the pack's attention math "
                     f"does not cover; it supports RMS norms with gains, or none")


def read_weights(key_patches: dict, site: DitSite, device, read_weight) -> AttentionWeights:
    """The site's q, k, v, out, QK-norm gains and biases in float32, this patcher's patches merged."""
    def weight(key, rows=None, columns=None):
        key = f"diffusion_model.{key}"
        return read_weight(key_patches, key, device, rows, columns) if key in key_patches else None
    def parts(name):  # q, k and v rows of the fused linear, or of the three
        found = [weight(f"{path}.{name}", rows=rows) for path, rows in site.linears]
        if found[0] is None:
            return None, None, None
        return found[0].chunk(3) if len(found) == 1 else found
    (q, k, v), biases = parts("weight"), parts("bias")
    out = weight(f"{site.out}.weight", columns=site.out_columns)
    return AttentionWeights(q, k, v, out, heads=site.heads, q_norm=site.q_norm and weight(site.q_norm),
                            k_norm=site.k_norm and weight(site.k_norm), q_bias=biases[0], k_bias=biases[1],
                            v_bias=biases[2])


@dataclass(frozen=True)
class ModelCall:
    """What a shift needs to know of the model call it runs in."""
    options: dict  # the call's transformer_options (sigmas, cond_or_uncond, ...)
    grid: tuple  # the latent's image tokens, (rows, columns)
    text_tokens: int  # tokens before the image tokens in a joint sequence


class ShiftsDuringCalls:
    """A model-call wrapper that, for the duration of each call, hooks the sites' linears so their outputs also get
    ``shift(call, x, out, image_of, rows)``'s change, and removes the hooks when the call ends.

    Only a clone carrying this wrapper ever runs with the hooks, weights are never touched (the host still loads,
    casts and LoRA-patches them as usual), and chained edits nest. ``image_of(vector)`` is the linear's image of a
    vector, or of a batch of them (the linear on them and on zero, differenced), so shifts stay exact under any
    patching, and derivatives pass through (forward-mode tangents, reverse-mode gradients). Flux-like
    models call DIFFUSION_MODEL wrappers (which see the text tokens as the blocks do); SD3's model does not, so
    its sites use the APPLY_MODEL wrapper around it (its image streams hold image tokens only).
    """

    def __init__(self, shifts: list, level: str):
        self.shifts, self.level = shifts, level  # [(DitSite, shift)], "diffusion_model" or "apply_model"
        self.images = {}  # a single vector's image per linear and weight state (see OutputShift)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, *args, **kwargs):
        if self.level == "apply_model":  # (x, t, c_concat, c_crossattn, control, transformer_options)
            model, context = executor.class_obj.diffusion_model, None
            options = _argument(args, kwargs, 4, "transformer_options")
        else:  # (x, timestep, context, ..., transformer_options)
            model, context = executor.class_obj, kwargs.get("context", args[1] if len(args) > 1 else None)
            options = _argument(args, kwargs, None, "transformer_options")
        patch = model.patch_size if isinstance(model.patch_size, int) else model.patch_size[-1]
        call = ModelCall(options or {}, tuple(-(-size // patch) for size in x.shape[-2:]),
                         context.shape[1] if context is not None else 0)
        handles = [model.get_submodule(path).register_forward_hook(OutputShift(call, shift, rows, self.images))
                   for site, shift in self.shifts for path, rows in site.linears]
        try:
            return executor(x, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def _argument(args, kwargs, index, name):
    """A wrapped call's ``name`` argument: by keyword, at ``index``, or the positional dict that has 'sigmas'."""
    if name in kwargs:
        return kwargs[name]
    if index is not None and len(args) > index:
        return args[index]
    return next((a for a in args if isinstance(a, dict) and "sigmas" in a), None)


class OutputShift:
    """One linear's forward hook for one call; the linear's own calls made to map a vector pass through. ``rows``:
    how many of its first output rows the shift moves.

    Mapping a vector reads the whole weight, which on a large linear costs as much as the call's tokens do; a
    single vector's image is kept in ``images`` while the weight the module computes with is the same: the same
    tensor and storage, with the same on-the-fly patch functions (lowvram LoRAs), unmodified: its version, or
    for an inference tensor (the host loads models in inference mode; it has no version) within one sampling
    run (the host's ``sample_sigmas`` of the run, held weakly: the host patches weights between runs, in place
    only then)."""

    def __init__(self, call: ModelCall, shift, rows: int, images: dict):
        self.call, self.shift, self.rows, self.images, self.mapping = call, shift, rows, images, False

    def __call__(self, module, args, out):
        if self.mapping:
            return None
        x = args[0]

        def image_of(vectors):  # [C] or [K, C] -> their images under the linear, [rows] or [K, rows]
            key = self.weight_state(module, vectors, x)
            if key is None:
                return mapped_images(vectors)
            run = self.call.options.get("sample_sigmas")
            kept = self.images.get(key)
            if kept is None or (kept[0] is not None and kept[0]() is not run):
                if len(self.images) > 256:  # weights changed many times (hook schedules): keep it small
                    self.images.clear()
                kept = self.images[key] = (None if run is None else weakref.ref(run), mapped_images(vectors))
            return kept[1]

        def mapped_images(vectors):
            flat = vectors.reshape(-1, vectors.shape[-1]).to(x.dtype)
            self.mapping = True
            try:
                mapped = module(torch.cat([flat, torch.zeros_like(flat[:1])]))
            finally:
                self.mapping = False
            images = mapped[:-1] - mapped[-1:]
            return images.reshape(*vectors.shape[:-1], images.shape[-1])
        return self.shift(self.call, x, out, image_of, self.rows)

    def weight_state(self, module, vectors, x):
        """What a kept image depends on, or None where it cannot be told (a batch of vectors, an inference weight
        outside a sampling run)."""
        weight = module.weight
        if vectors.ndim != 1 or (weight.is_inference() and self.call.options.get("sample_sigmas") is None):
            return None
        versions = tuple(None if t.is_inference() else t._version for t in (weight, vectors))
        return (id(module), id(weight), weight.data_ptr(), *versions, id(vectors), vectors.data_ptr(), x.dtype,
                x.device, *map(id, getattr(module, "weight_function", ())),
                *map(id, getattr(module, "bias_function", ())),
                # newer hosts' dynamic loading (0.38) keeps a LoRA in these
                id(getattr(module, "weight_lowvram_function", None)),
                id(getattr(module, "bias_lowvram_function", None)))


def add_shifts(patcher, shifts: list) -> None:
    """Put ``shifts`` [(DitSite, shift)] on ``patcher`` (a clone): see :class:`ShiftsDuringCalls`."""
    for level in dict.fromkeys(site.call_wrapper for site, _ in shifts):
        patcher.add_wrapper_with_key(WRAPPER_TYPES[level], WRAPPER_KEY, ShiftsDuringCalls(
            [(site, shift) for site, shift in shifts if site.call_wrapper == level], level))


def shifts_on(model_options: dict) -> list:
    """Every (DitSite, shift) of the wrappers on a sampling run's model options (the host copies a patcher's
    wrappers into them before it samples), so a sampler can see the edits on the model it runs."""
    wrappers = [wrapper for kind in WRAPPER_TYPES.values()
                for wrapper in comfy.patcher_extension.get_all_wrappers(kind, model_options, is_model_options=True)]
    return [pair for wrapper in wrappers if isinstance(wrapper, ShiftsDuringCalls) for pair in wrapper.shifts]


def first_linear(site: DitSite) -> DitSite:
    """The site with only its first linear hooked: enough to see its input (its q, k and v share it)."""
    return dataclasses.replace(site, linears=site.linears[:1])


def image_token_range(site: DitSite, call: ModelCall) -> slice:
    """The latent's image tokens in the site's linear input (reference-image tokens that follow stay out)."""
    start = call.text_tokens if site.joint else 0
    return slice(start, start + call.grid[0] * call.grid[1])
