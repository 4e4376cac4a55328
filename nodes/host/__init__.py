"""Everything the pack reads from the host's internals, in one place, so a host change is a local change.

A model's attention sites and their weights as a patcher sees them (UNet self-attention layers here,
transformer blocks in :mod:`.dit`); the attention-layer path format; how the host lays out a model batch
(cond/uncond chunks) and the keys its patches receive;
its model sampling (sigma schedule, flow or not, noise scaling) and latent format; its ancestral step.
"""
import contextlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.attention

import comfy.k_diffusion.sampling
import comfy.ldm.modules.attention
import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

from ...directions.apply import Rows
from ...directions.attention import AttentionWeights
from ...directions.directionset import HSPACE, model_fingerprint
from . import dit

UNET_FAMILIES = "SD1.x, SD2.x, SDXL and other UNets of the same block structure"
SUPPORTED_FAMILIES = f"{UNET_FAMILIES}; {dit.FAMILIES}"
GROUPS = {"all": "", "input": "input_blocks", "middle": "middle_block", "output": "output_blocks", **dit.GROUPS}
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# The attention-layer path format, e.g. 'input_blocks.7.1.transformer_blocks.0.attn1': the UNet block,
# the module inside it, and the transformer block's index.
_ATTENTION_PATH = re.compile(r"^(?P<block>input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\."
                             r"transformer_blocks\.(?P<index>\d+)\.attn1$")

# The host's cond_or_uncond codes, and what Apply Direction's apply_to selects.
COND, UNCOND = 0, 1
PASSES = {"both": (COND, UNCOND), "cond": (COND,), "uncond": (UNCOND,)}
# transformer_options keys the Asyrp sampler sets: UNEDITED is "copies" (each chunk's second half
# runs unedited) or "all" (the whole call runs unedited); SAMPLER names the sampler for the patches.
UNEDITED = "semantic_directions_unedited"
SAMPLER = "semantic_directions_sampler"
ASYRP = "asyrp"
# The transformer_options key every host attention function defers to (the host's runtime attention selection).
ATTENTION_OVERRIDE = "optimized_attention_override"
ATTENTION_BLOCK_BYTES = 256 * 2 ** 20  # score matrices' memory per block of queries in forward-mode attention

ancestral_split = comfy.k_diffusion.sampling.get_ancestral_step


def family(patcher) -> str:
    return type(patcher.model.model_config).__name__


def attention_layers(patcher) -> dict:
    """Every self-attention (attn1) module of a UNet by path, in the UNet's order; {} for other models."""
    unet = getattr(patcher.model, "diffusion_model", None)
    return {} if unet is None else {
        name: module for name, module in unet.named_modules()
        if name.endswith(".attn1") and all(hasattr(module, p.split(".")[0]) for p in _PROJECTIONS)
        and hasattr(module, "heads")}


@dataclass(frozen=True)
class AttentionSite:
    """A self-attention site: its heads, its input width, and ``read(key_patches, device)``, its weights."""
    heads: int
    width: int
    read: Callable


def attention_sites(patcher) -> dict:
    """Every self-attention site by path, in the model's order: a UNet's attn1 layers, or a transformer's image
    attention (:mod:`.dit`). Other models are refused by name."""
    layers = attention_layers(patcher)
    if layers:
        return {path: AttentionSite(module.heads, module.to_q.weight.shape[1],
                                    lambda key_patches, device, path=path, heads=module.heads:
                                    read_attention_weights(key_patches, path, heads, device))
                for path, module in layers.items()}
    blocks = dit.sites(patcher)
    if blocks:
        return {path: AttentionSite(site.heads, site.width, lambda key_patches, device, site=site:
                                    dit.read_weights(key_patches, site, device, read_weight))
                for path, site in blocks.items()}
    raise ValueError(f"model: no self-attention layers found in this {family(patcher)} model; the pack supports "
                     f"{SUPPORTED_FAMILIES} (not other models yet)")


def site_widths(patcher) -> dict:
    return {path: site.width for path, site in attention_sites(patcher).items()}


def select_layers(paths: list, spec: str, input_name: str = "layers") -> list:
    """Layers named by comma-separated groups (all, input, middle, output), paths or path prefixes."""
    chosen = set()
    for item in (part.strip().rstrip(".") for part in (spec.strip() or "all").split(",")):
        prefix = GROUPS.get(item, item)
        matches = {p for p in paths if item == "all" or p == prefix or p.startswith(prefix + ".")}
        if not item or not matches:
            blocks = dict.fromkeys(block_of(p) for p in paths)
            groups = [g for g, prefix in GROUPS.items() if any(p.startswith(prefix) for p in paths)]
            raise ValueError(f"{input_name}: {item!r} names none of the layers here; use groups "
                             f"({', '.join(groups)}), or paths or prefixes among: {', '.join(blocks)}")
        chosen |= matches
    return [p for p in paths if p in chosen]


def read_weight(key_patches: dict, key: str, device, rows: int | None = None,
                columns: int | None = None) -> torch.Tensor:
    """One weight in float32 on ``device``, this patcher's patches merged; only its first ``rows`` and ``columns``
    if given.

    ``key_patches`` is ``patcher.get_key_patches("diffusion_model.")``: the stored weight (the
    original, even when another clone's LoRA is currently merged into the live module), its
    dequantizing convert function, and this patcher's own patch list. Nothing is written back. A
    plain tensor without patches is cut before it is converted (Flux's single blocks keep their
    attention in a third of linear1's rows); anything else is converted and patched whole.
    """
    if key not in key_patches:  # newer hosts (0.38) leave out weights that are not tensors
        raise ValueError(f"model: the host gives no weight tensor for {key}, which this layer's directions need; "
                         f"load the model with a standard loader")
    (weight, convert), *patches = key_patches[key]
    cut = (slice(rows), slice(columns)) if weight.ndim == 2 else (slice(rows),)
    if not patches and type(weight) in (torch.Tensor, torch.nn.Parameter):
        return convert(weight.detach()[cut], inplace=False).to(device=device, dtype=torch.float32)
    weight = convert(weight, inplace=False).detach().to(device=device, dtype=torch.float32)
    return (comfy.lora.calculate_weight(patches, weight.clone(), key) if patches else weight)[cut]


def read_attention_weights(key_patches: dict, path: str, heads: int, device) -> AttentionWeights:
    """A UNet attention layer's q, k, v and out weights (see :func:`read_weight`)."""
    return AttentionWeights(*(read_weight(key_patches, f"diffusion_model.{path}.{projection}.weight", device)
                              for projection in _PROJECTIONS), heads=heads)


def block_of(path: str) -> str:
    """The UNet block an attention path lies in ('input_blocks.7', 'middle_block'); other sites as they are."""
    match = _ATTENTION_PATH.match(path)
    return match["block"] if match else path


def block_key(path: str):
    """The host's (block, block_index, transformer index) for an attn1 path, as its patches see them.

    'input_blocks.7.1.transformer_blocks.0.attn1' -> ('input', 7, 0); the middle block is ('middle', 0, i).
    """
    match = _ATTENTION_PATH.match(path)
    if match is None:
        raise ValueError(f"directions: {path} is not an attention layer inside the UNet's input, middle or "
                         f"output blocks")
    kind, _, index = match["block"].partition(".")
    return kind.removesuffix("_blocks").removesuffix("_block"), int(index or 0), int(match["index"])


def site_paths(patcher) -> list:
    """Every site a direction can be recorded or applied at: a UNet's attn1 layers then h-space, or a transformer's
    image-attention sites."""
    layers = attention_layers(patcher)
    if layers:
        return [*layers, HSPACE]
    blocks = dit.sites(patcher)
    if blocks:
        return list(blocks)
    raise ValueError(f"model: no self-attention layers found in this {family(patcher)} model; this node supports "
                     f"{SUPPORTED_FAMILIES}")


def sampling_inputs() -> dict:
    """KSampler's sampling inputs, as the host lists them (its samplers and schedulers)."""
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                 "The noise seed (each image of the latent batch gets its own noise, as in KSampler)."}),
        "add_noise": (["enable", "disable"], {"default": "enable", "tooltip":
                      "enable: sample from the seed's noise. disable: the latent is already noise, e.g. DDIM "
                      "Invert's output, so its images are sampled back."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps, as in KSampler."}),
        "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip":
                "Guidance scale, as in KSampler (the conditional pass is what is recorded)."}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampler, as in KSampler."}),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The scheduler, as in KSampler."}),
    }


def sample(patcher, latent: dict, positive, negative, seed: int, add_noise: bool, steps: int, cfg: float,
           sampler_name: str, scheduler: str, progress=None) -> torch.Tensor:
    """KSampler(Advanced)'s sampling of ``latent`` (its batch_index and noise mask honoured), without
    previews; ``progress`` (a ProgressBar) advances a step at a time, and cancelling stops it."""
    samples = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    if add_noise:
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    else:
        noise, samples = start_at(patcher, samples, steps, scheduler)

    def step(*_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if progress is not None:
            progress.update(1)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                               disable_noise=not add_noise, force_full_denoise=True,
                               noise_mask=latent.get("noise_mask"), callback=step, disable_pbar=True, seed=seed)


def noise_for_start(patcher, start: torch.Tensor, latent: torch.Tensor, sigma: float, input_name: str):
    """The noise from which the host's samplers start exactly at ``start`` (model space) when given ``latent``
    (model space; zeros for an empty latent) on a schedule beginning at ``sigma``: every model type defines its
    noise_scaling its own way, but always affine in the noise, so the noise is solved through that function."""
    sampling = patcher.model.model_sampling
    sigma_max = float(sampling.sigma_max)
    at_max = math.isclose(sigma_max, sigma, rel_tol=1e-5) or sigma > sigma_max  # as the host's KSAMPLER decides

    def start_from(noise):
        return sampling.noise_scaling(torch.tensor(sigma), noise, latent, max_denoise=at_max)
    offset = start_from(torch.zeros_like(latent))
    slope = start_from(torch.ones_like(latent)) - offset
    if not slope.ne(0).all():
        raise ValueError(f"{input_name}: this model's sampling does not start from noise, so no noise reaches the "
                         f"inverted latent; use a text-to-image model")
    return (start - offset) / slope


def start_at(patcher, samples: torch.Tensor, steps: int, scheduler: str):
    """(noise, latent) that make the host's sampler start at ``samples`` itself, as add_noise disabled promises
    for an inverted latent. EPS and v models start there from zero noise; flow models' schedules start at
    sigma 1, where the host's start, (1 - sigma) x latent, is zeros: they get the noise that is the latent."""
    zeros = torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout, device="cpu")
    model = patcher.model
    start = model.process_latent_in(model_latent(patcher, samples).float())
    sigma = float(comfy.samplers.calculate_sigmas(model.model_sampling, scheduler, steps)[0])
    if torch.equal(model.model_sampling.noise_scaling(torch.tensor(sigma), torch.zeros_like(start), start), start):
        return zeros, samples
    return noise_for_start(patcher, start, torch.zeros_like(start), sigma, "latent").to(samples.dtype), zeros


def hspace_width(patcher) -> int:
    """Channels of the middle block's output (h-space)."""
    middle = getattr(getattr(patcher.model, "diffusion_model", None), "middle_block", None)
    if middle is None:
        raise ValueError(f"model: this {family(patcher)} model has no UNet middle block, so no h-space; "
                         f"h-space directions support {UNET_FAMILIES}")
    return middle[-1].out_channels


def made_for(patcher) -> dict:
    """A direction set's ``model`` entry for sets made on this model."""
    return {"family": family(patcher), "fingerprint": fingerprint(patcher)}


def fingerprint(patcher) -> str:
    """What a direction set records of its model: the family and every attention layer's width.

    A fine-tune or a LoRA of a base model shares its fingerprint (the directions fit it); another
    family, or the same family built with other widths, does not.
    """
    return model_fingerprint(family(patcher), site_widths(patcher))


def batch_rows(options: dict, count: int, passes: tuple) -> Rows:
    """The :class:`Rows` of a model batch of ``count`` rows from the options the host passes its patches.

    The host stacks equal chunks in ``cond_or_uncond`` order; within a chunk, row i is image i. With
    the Asyrp sampler's unedited copies, each chunk holds the images twice, the second copy unedited.
    """
    cond_or_uncond = options["cond_or_uncond"]
    copies = options.get(UNEDITED) == "copies"
    chunk = count // len(cond_or_uncond)
    images = chunk // 2 if copies else chunk
    within = torch.arange(count) % chunk
    chosen = torch.tensor([code in passes for code in cond_or_uncond]).repeat_interleave(chunk)
    sigmas = options["sigmas"].flatten().float().cpu()
    return Rows(image=within % images, edited=chosen & ~(copies & (within >= images)),
                sigma=sigmas[torch.arange(count) % sigmas.numel()], images=images)


def attn1_block(options: dict):
    """The (block, block_index, transformer index) an attn1_patch call is at, as :func:`block_key` gives them."""
    block = options.get("block")
    return (*block, options.get("block_index", 0)) if block else None


def attn1_shifted(n, context_attn1, value_attn1, shifted):
    """attn1_patch's return for self-attention whose input ``n`` became ``shifted``: q, k and v all move."""
    delta = shifted - n
    return tuple(shifted if t is n else t + delta if t.shape == n.shape else t for t in (n, context_attn1, value_attn1))


def has_batch_keys(options: dict, grid: bool = True) -> bool:
    """The keys the host's batching sets; a model called some other way runs unedited."""
    return "cond_or_uncond" in options and "sigmas" in options and (not grid or "activations_shape" in options)


@contextlib.contextmanager
def differentiable(model: torch.nn.Module):
    """Reverse-mode autograd through a host model. The host loads weights in inference mode, whose tensors
    autograd refuses to save for a backward pass: for the duration, every inference tensor among the modules'
    parameters, buffers and tensor attributes is replaced by a normal tensor on the same storage (no copy,
    values untouched; nothing may write through them), and put back after. Flux-like blocks add to their
    activations in place (``img += ...``) after a norm has saved them: activations on the gradient's path
    are saved as copies."""
    swapped = []
    for module in model.modules():
        for store in (module._parameters, module._buffers, module.__dict__):
            for name, value in list(store.items()):
                if type(value) in (torch.Tensor, torch.nn.Parameter) and value.is_inference():
                    alias = torch.empty(0, dtype=value.dtype, device=value.device).set_(
                        value.untyped_storage(), value.storage_offset(), value.shape, value.stride())
                    store[name] = torch.nn.Parameter(alias, False) if type(value) is torch.nn.Parameter else alias
                    swapped.append((store, name, value))
    try:
        with torch.autograd.graph.saved_tensors_hooks(_copy_if_differentiated, _as_saved):
            yield
    finally:
        for store, name, value in swapped:
            store[name] = value


def forward_mode_attention(patcher) -> None:
    """Lets forward-mode derivatives pass a patched clone's attention, part one: the fused attention kernels
    (PyTorch's flash and memory-efficient ones, the default on NVIDIA GPUs; xformers, sage) have no forward-mode
    rule, so an attention call of the host's whose inputs carry tangents runs the host's sub-quadratic attention
    instead (chunked plain tensor operations, sized by the host to the device's memory). Every other call goes
    where it went (to an override already set, else to the host's choice), so plain and reverse-mode calls keep
    the fused kernels. Part two, :func:`tangent_attention`, catches what reaches PyTorch's attention directly."""
    options = patcher.model_options.setdefault("transformer_options", {})
    previous = options.get(ATTENTION_OVERRIDE)
    chunked = comfy.ldm.modules.attention.get_attention_function("sub_quad")

    def override(func, *args, **kwargs):
        if any(_has_tangent(value) for value in (*args[:3], *(kwargs.get(name) for name in ("q", "k", "v")))):
            return chunked(*args, **kwargs)
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
    options[ATTENTION_OVERRIDE] = override


@contextlib.contextmanager
def training_kernels():
    """Newer hosts (0.38) run some steps through fused kernels that have no derivatives unless the host's own
    training flag, ``comfy.model_management.in_training``, is set (Flux's rotary embedding goes through a
    comfy_kitchen custom op otherwise); for the duration, the flag is set where the host has it, and put back
    after. Hosts without the flag (0.3.75) run as they are."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


class tangent_attention(torch.overrides.TorchFunctionMode):  # named as a context, like torch.no_grad
    """Inside: PyTorch's scaled dot-product attention on inputs that carry forward-mode tangents runs its math
    backend, which has a forward-mode rule, a block of queries at a time so that no score matrix passes
    ATTENTION_BLOCK_BYTES. Catches the attention calls the host makes without the override (SD3's blocks on
    0.3.75, a backend priority the host forces), whatever backends the host enabled."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention or not any(
                _has_tangent(value) for value in args[:3]):
            return func(*args, **kwargs)
        query, key, value, *rest = args  # rest: attn_mask, dropout_p, is_causal, ... as far as given
        mask = rest.pop(0) if rest else kwargs.pop("attn_mask", None)
        causal = kwargs.get("is_causal", len(rest) > 1 and rest[1])  # causal masks do not split by queries
        scores = query.numel() // query.shape[-1] * key.shape[-2] * query.element_size() * 2  # with the tangent
        rows = query.shape[-2] if causal else max(1, query.shape[-2] * ATTENTION_BLOCK_BYTES // max(scores, 1))
        per_row = mask is not None and mask.dim() >= 2 and mask.shape[-2] > 1
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            return torch.cat([func(query[..., i:i + rows, :], key, value,
                                   mask[..., i:i + rows, :] if per_row else mask, *rest, **kwargs)
                              for i in range(0, query.shape[-2], rows)], dim=-2)


def _has_tangent(value) -> bool:
    return isinstance(value, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(value).tangent is not None


def _copy_if_differentiated(saved: torch.Tensor) -> torch.Tensor:
    return saved.clone() if saved.requires_grad else saved


def _as_saved(saved: torch.Tensor) -> torch.Tensor:
    return saved


def model_sampling(patcher):
    return patcher.get_model_object("model_sampling")


def is_flow(sampling) -> bool:
    """Flow matching (x = (1 - sigma) x0 + sigma noise: SD3, Flux) rather than x = x0 + sigma noise."""
    return isinstance(sampling, comfy.model_sampling.CONST)


# Model sampling types whose sampling starts from an image, not from noise: nothing to invert to.
_IMAGE_STARTS = ("IMG_TO_IMG", "IMG_TO_IMG_FLOW", "IMG_TO_IMG_VELOCITY")


def check_invertible(patcher) -> None:
    """Refuse models whose sampling does not start from noise (img-to-img types), by name."""
    sampling = model_sampling(patcher)
    kinds = [cls.__name__ for cls in type(sampling).__mro__]
    refused = next((kind for kind in kinds if kind in _IMAGE_STARTS), None)
    if refused:
        raise ValueError(f"model: its sampling type {refused} starts from an image, not from noise, so there is "
                         f"no noise to invert to; use a text-to-image model")


def model_latent(patcher, samples: torch.Tensor) -> torch.Tensor:
    """The latent as the model takes it: an image latent [B, C, H, W] on a model of video latents (Qwen-Image's,
    Wan's) gains its frame axis, as the host's samplers add it (comfy.sample.fix_empty_latent_channels)."""
    dims = getattr(patcher.get_model_object("latent_format"), "latent_dimensions", 2)
    return samples.unsqueeze(2) if dims == 3 and samples.ndim == 4 else samples


def check_latent_fits(patcher, samples: torch.Tensor, name: str) -> None:
    """The latent's layout and channels must be the model's (image models: [batch, channels, H, W]; models of
    video latents also take an image latent, as the host's samplers do)."""
    latent_format = patcher.get_model_object("latent_format")
    dims, channels = getattr(latent_format, "latent_dimensions", 2), latent_format.latent_channels
    expected = "[batch, channels, frames, height, width]" if dims == 3 else "[batch, channels, height, width]"
    if samples.ndim != dims + 2 and not (dims == 3 and samples.ndim == 4):
        raise ValueError(f"{name}: this {family(patcher)} model takes {dims + 2}-D latents {expected}, got shape "
                         f"{list(samples.shape)}" + ("; video latents need a video model" if samples.ndim > 4 else ""))
    if samples.shape[1] != channels:
        raise ValueError(f"{name}: {samples.shape[1]} channels, but this {family(patcher)} model's latents have "
                         f"{channels}; encode the image with this model's VAE")


def check_conditioning_fits(patcher, conditioning, name: str) -> None:
    """Every conditioning tensor must have the width of the model's cross-attention context."""
    width = getattr(patcher.model.model_config, "unet_config", {}).get("context_dim")
    for tensor, _ in conditioning:
        if width is not None and tensor.shape[-1] != width:
            raise ValueError(f"{name}: the conditioning is {tensor.shape[-1]} wide but this {family(patcher)} model "
                             f"takes {width}; encode the prompt with the CLIP of this model's checkpoint")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name}: the conditioning holds NaN or infinite values")


WARNED = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in WARNED:
        WARNED.add(key)
        logging.warning(message)
