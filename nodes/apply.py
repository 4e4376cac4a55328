"""Apply Direction: patch a clone of the MODEL so a direction is added at its sites inside a timestep range."""
import math

from ..directions.apply import PASSES, DirectionEdit, parse_numbers, shift_feature_map
from ..directions.directionset import ATTN1, HSPACE, site_kind
from . import unet
from .common import CATEGORY, DIRECTIONS

# transformer_options key the Asyrp sampler sets: "copies" (each chunk's second half runs unedited)
# or "all" (the whole call runs unedited).
UNEDITED = "semantic_directions_unedited"


class Attn1Patch:
    """attn1_patch: adds the edit to the q, k and v inputs of the named self-attention layers."""

    def __init__(self, edit: DirectionEdit, sites_by_block: dict):
        self.edit, self.sites_by_block = edit, sites_by_block

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        block = extra_options.get("block")
        site = self.sites_by_block.get((*block, extra_options.get("block_index", 0))) if block else None
        unedited = extra_options.get(UNEDITED)
        if site is None or unedited == "all" or not _has_batch_keys(extra_options):
            return n, context_attn1, value_attn1
        shifted = self.edit.shift(site, n, extra_options["activations_shape"][-2:], extra_options["cond_or_uncond"],
                                  extra_options["sigmas"], unedited_copies=unedited == "copies")
        if shifted is n:
            return n, context_attn1, value_attn1
        delta = shifted - n
        return tuple(shifted if t is n else t + delta if t.shape == n.shape else t
                     for t in (n, context_attn1, value_attn1))


class HSpacePatch:
    """output_block_patch: adds the edit to h-space, the middle block's output; skips stay untouched."""

    def __init__(self, edit: DirectionEdit):
        self.edit = edit

    def __deepcopy__(self, memo):
        return self

    def __call__(self, h, hsp, transformer_options):
        unedited = transformer_options.get(UNEDITED)
        if transformer_options.get("block") != ("output", 0) or unedited == "all" \
                or not _has_batch_keys(transformer_options, grid=False):
            return h, hsp
        return shift_feature_map(self.edit, HSPACE, h, transformer_options["cond_or_uncond"],
                                 transformer_options["sigmas"], unedited_copies=unedited == "copies"), hsp


def _has_batch_keys(options: dict, grid: bool = True) -> bool:
    """The keys the host's batching sets; a model called some other way runs unedited."""
    return "cond_or_uncond" in options and "sigmas" in options and (not grid or "activations_shape" in options)


def edits_on(model_options: dict) -> list:
    """The DirectionEdits that Apply Direction nodes put on a model (read by the Asyrp sampler)."""
    patches = model_options.get("transformer_options", {}).get("patches", {})
    return [p.edit for key in ("attn1_patch", "output_block_patch") for p in patches.get(key, [])
            if isinstance(p, (Attn1Patch, HSpacePatch))]


class ApplyDirection:
    DESCRIPTION = (
        "Returns a patched copy of the MODEL (the input is never changed) that adds one direction of the "
        "set at its sites (self-attention inputs, or h-space) while sampling is inside the timestep range. "
        "alpha is the shift length in units of the site's typical token norm, so the same value means the "
        "same strength at every layer. Chain several to combine edits; give alpha_list to render a sweep.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The patched model; feed it to KSampler, SamplerCustom or the Asyrp Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to edit; a patched clone is returned."}),
            "directions": (DIRECTIONS, {"tooltip": "From Discover Attention Eigendirections or Load Directions."}),
            "index": ("INT", {"default": 0, "min": 0, "max": 4095, "tooltip":
                      "Which direction of the set (0 is the strongest); the same index at every chosen site."}),
            "layer": ("STRING", {"default": "all", "tooltip":
                      "Sites of the set to use: all, or comma-separated site paths or prefixes "
                      "(e.g. 'input_blocks.7' or 'h_space')."}),
            "alpha": ("FLOAT", {"default": 0.5, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip":
                      "Strength: shift length as a fraction of the site's RMS token norm (0.1 subtle, "
                      "1 a whole token). Negative reverses the edit; 0 leaves the model exactly as it was."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                              "Where the edit starts, in model time (0 = first step, highest noise), as in "
                              "ConditioningSetTimestepRange."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                            "Where the edit ends, in model time (1 = last step)."}),
            "apply_to": (list(PASSES), {"default": "both", "tooltip":
                         "Edit the conditional pass, the unconditional pass, or both."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Edit only where the mask is on (resized to each layer's token grid); "
                                         "tokens outside are exactly unchanged. One mask, or one per image."}),
            "alpha_list": ("STRING", {"default": "", "tooltip":
                           "A sweep, e.g. '-2,-1,0,1,2': image i of the latent batch gets value i "
                           "(overrides alpha). Use a latent batch of the same size."}),
        }}

    def apply(self, model, directions, index, layer, alpha, start_percent, end_percent, apply_to,
              mask=None, alpha_list=""):
        alphas = parse_numbers(alpha_list) if alpha_list.strip() else [alpha]
        if not all(math.isfinite(a) for a in alphas):
            raise ValueError(f"alpha: {alpha} is not a finite number")
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}); "
                             f"the edit range must start before it ends")
        sites = unet.select_layers(list(directions.sites), layer, input_name="layer")
        smallest = min(directions.sites[s].count for s in sites)
        if index >= smallest:
            raise ValueError(f"index: {index} is out of range; this set has {smallest} directions per site "
                             f"(0 to {smallest - 1})")
        check_sites_fit(model, directions, sites)
        if mask is not None:
            mask = as_mask_batch(mask)
            if len(alphas) > 1 and mask.shape[0] > 1 and len(alphas) != mask.shape[0]:
                raise ValueError(f"mask: {mask.shape[0]} masks but alpha_list has {len(alphas)} values; give one "
                                 f"mask, or one per image")
        sampling = model.get_model_object("model_sampling")
        edit = DirectionEdit({s: directions.sites[s].vectors[index].clone() for s in sites}, alphas,
                             sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent),
                             PASSES[apply_to], mask)
        patched = model.clone()
        attention_sites = {unet.block_key(s): s for s in sites if site_kind(s) == ATTN1}
        if attention_sites:
            patched.set_model_attn1_patch(Attn1Patch(edit, attention_sites))
        if HSPACE in sites:
            patched.set_model_output_block_patch(HSpacePatch(edit))
        return (patched,)


def as_mask_batch(mask):
    """A MASK as [M, H, W] float on the CPU: [H, W], [M, H, W], [M, 1, H, W] and [M, H, W, 1] are accepted."""
    if mask.ndim == 4 and 1 in (mask.shape[1], mask.shape[-1]):
        mask = mask.squeeze(1) if mask.shape[1] == 1 else mask.squeeze(-1)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise ValueError(f"mask: expected a MASK of shape [H, W] or [batch, H, W], got {list(mask.shape)}")
    return mask.detach().float().cpu()


def check_sites_fit(model, directions, sites) -> None:
    """Every site must exist in this model with the set's width; latent sets belong to the SVD nodes."""
    made_for = directions.model.get("family", "another model")
    widths = None
    for site in sites:
        kind, width = site_kind(site), directions.sites[site].width
        if kind == ATTN1:
            widths = widths or unet.layer_widths(unet.attention_layers(model))
            here = widths.get(site)
        elif kind == HSPACE:
            here = unet.hspace_width(model)
        else:
            raise ValueError(f"directions: '{site}' directions act on the latent itself; use them with the "
                             f"SVD latent nodes, not Apply Direction")
        if here is None:
            raise ValueError(f"directions: {site} does not exist in this {unet.family(model)} model (the set "
                             f"was made for {made_for}); use directions discovered on this model")
        if here != width:
            raise ValueError(f"directions: {site} has width {here} in this {unet.family(model)} model but "
                             f"{width} in the set (made for {made_for}); use directions discovered on this model")


NODE_CLASS_MAPPINGS = {"ApplyDirection": ApplyDirection}
NODE_DISPLAY_NAME_MAPPINGS = {"ApplyDirection": "Apply Direction"}
