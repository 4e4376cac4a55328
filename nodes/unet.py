"""Reading a host UNet: its self-attention layers, and their weights as this patcher sees them."""
import re

import torch

import comfy.lora

from ..directions.attention import AttentionWeights

SUPPORTED_FAMILIES = "SD1.x, SD2.x, SDXL and other UNets of the same block structure"
GROUPS = {"all": "", "input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def family(patcher) -> str:
    return type(patcher.model.model_config).__name__


def attention_layers(patcher) -> dict:
    """Every self-attention (attn1) module of the UNet by path, in the UNet's order."""
    unet = getattr(patcher.model, "diffusion_model", None)
    layers = {} if unet is None else {
        name: module for name, module in unet.named_modules()
        if name.endswith(".attn1") and all(hasattr(module, p.split(".")[0]) for p in _PROJECTIONS)
        and hasattr(module, "heads")}
    if not layers:
        raise ValueError(f"model: no UNet self-attention layers found in this {family(patcher)} model; "
                         f"attention eigendirections support {SUPPORTED_FAMILIES} (not Flux, SD3 or "
                         f"other transformer-only models)")
    return layers


def layer_widths(layers: dict) -> dict:
    return {name: module.to_q.weight.shape[1] for name, module in layers.items()}


def select_layers(paths: list, spec: str, input_name: str = "layers") -> list:
    """Layers named by comma-separated groups (all, input, middle, output), paths or path prefixes."""
    chosen = set()
    for item in (part.strip().rstrip(".") for part in (spec.strip() or "all").split(",")):
        prefix = GROUPS.get(item, item)
        matches = {p for p in paths if item == "all" or p == prefix or p.startswith(prefix + ".")}
        if not item or not matches:
            blocks = dict.fromkeys(p.split(".transformer_blocks")[0] for p in paths)
            raise ValueError(f"{input_name}: {item!r} names none of the layers here; use groups "
                             f"({', '.join(GROUPS)}), or paths or prefixes among: {', '.join(blocks)}")
        chosen |= matches
    return [p for p in paths if p in chosen]


def read_attention_weights(patcher, key_patches: dict, path: str, heads: int, device) -> AttentionWeights:
    """One layer's q, k, v and out weights in float32 on ``device``, with this patcher's patches merged.

    ``key_patches`` is ``patcher.get_key_patches("diffusion_model.")``: the stored weight (the
    original, even when another clone's LoRA is currently merged into the live module), its
    dequantizing convert function, and this patcher's own patch list. Nothing is written back.
    """
    tensors = []
    for projection in _PROJECTIONS:
        key = f"diffusion_model.{path}.{projection}.weight"
        (weight, convert), *patches = key_patches[key]
        weight = convert(weight, inplace=False).to(device=device, dtype=torch.float32)
        if patches:
            weight = comfy.lora.calculate_weight(patches, weight.clone(), key)
        tensors.append(weight)
    return AttentionWeights(*tensors, heads=heads)


_BLOCK_PATH = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\..*transformer_blocks\.(\d+)\.attn1$")


def block_key(path: str):
    """The host's (block, block_index) for an attn1 path, as its patches see them in extra_options.

    'input_blocks.7.1.transformer_blocks.0.attn1' -> ('input', 7, 0); the middle block is ('middle', 0, i).
    """
    match = _BLOCK_PATH.match(path)
    if match is None:
        raise ValueError(f"directions: {path} is not inside the UNet's input, middle or output blocks")
    if match[1] == "middle_block":
        return "middle", 0, int(match[2])
    kind, index = match[1].split(".")
    return kind.removesuffix("_blocks"), int(index), int(match[2])


def hspace_width(patcher) -> int:
    """Channels of the middle block's output (h-space)."""
    middle = getattr(getattr(patcher.model, "diffusion_model", None), "middle_block", None)
    if middle is None:
        raise ValueError(f"model: this {family(patcher)} model has no UNet middle block, so no h-space; "
                         f"h-space directions support {SUPPORTED_FAMILIES}")
    return middle[-1].out_channels
