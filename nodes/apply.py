"""Apply Direction: patch a clone of the MODEL so a direction is added at its sites inside a timestep range."""


from ..directions.apply import DirectionEdit, shift_feature_map
from ..directions.directionset import ATTN1, DIT, HSPACE, site_kind
from . import host
from .common import CATEGORY, DIRECTIONS, finite, finite_tensor, parse_numbers


class _Patch:
    """What both patches share: the edit, the passes it applies to, and the batch's rows, read once per
    model call (every layer of one call passes the same ``sigmas`` object)."""

    def __init__(self, edit: DirectionEdit, passes: tuple):
        self.edit, self.passes, self._last = edit, passes, (None, None)

    def __deepcopy__(self, memo):  # host clones copy model_options; the patch is immutable and shared
        return self

    def rows(self, options: dict, count: int):
        key = (options["sigmas"], count, tuple(options["cond_or_uncond"]), options.get(host.UNEDITED))
        last_key, rows = self._last
        if last_key is None or last_key[0] is not key[0] or last_key[1:] != key[1:]:
            rows = host.batch_rows(options, count, self.passes)
            alphas, masks = len(self.edit.alphas), 1 if self.edit.mask is None else self.edit.mask.shape[0]
            if alphas not in (1, rows.images):
                raise ValueError(f"alpha_list: {alphas} values for a latent batch of {rows.images} images; give one "
                                 f"value per image")
            if masks not in (1, rows.images):
                raise ValueError(f"mask: {masks} masks for a latent batch of {rows.images} images; give one mask "
                                 f"or one per image")
            self._last = (key, rows)
        return rows


class Attn1Patch(_Patch):
    """attn1_patch: adds the edit to the q, k and v inputs of the named self-attention layers."""

    def __init__(self, edit: DirectionEdit, passes: tuple, sites_by_block: dict):
        super().__init__(edit, passes)
        self.sites_by_block = sites_by_block

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        site = self.sites_by_block.get(host.attn1_block(extra_options))
        if site is None or extra_options.get(host.UNEDITED) == "all" or not host.has_batch_keys(extra_options):
            return n, context_attn1, value_attn1
        rows = self.rows(extra_options, n.shape[0])
        shifted = self.edit.shift(site, n, extra_options["activations_shape"][-2:], rows)
        if shifted is n:
            return n, context_attn1, value_attn1
        return host.attn1_shifted(n, context_attn1, value_attn1, shifted)


class HSpacePatch(_Patch):
    """output_block_patch: adds the edit to h-space, the middle block's output; skips stay untouched."""

    def __call__(self, h, hsp, transformer_options):
        if transformer_options.get("block") != ("output", 0) or transformer_options.get(host.UNEDITED) == "all" \
                or not host.has_batch_keys(transformer_options, grid=False):
            return h, hsp
        shifted = shift_feature_map(self.edit, HSPACE, h, self.rows(transformer_options, h.shape[0]))
        if shifted is not h and transformer_options.get(host.SAMPLER) != host.ASYRP:
            host.warn_once("h-space without Asyrp", "Apply Direction: an h-space edit is sampled without the Asyrp "
                           "Sampler; a plain sampler shifts both halves of each step, which cancels to first order, "
                           "so the edit will barely show. Sample with the Asyrp Sampler (SamplerCustom).")
        return shifted, hsp


class DitShift:
    """A transformer site's edit on its linear's output: the q, k and v rows move by the shift's image under the
    linear (coefficients x W n), on the latent's image tokens only; text and reference-image tokens stay."""

    def __init__(self, patch: _Patch, path: str, site):
        self.patch, self.path, self.site = patch, path, site

    def __call__(self, call, x, out, image_of, rows):
        options = call.options
        if options.get(host.UNEDITED) == "all" or not host.has_batch_keys(options, grid=False):
            return out
        tokens = host.dit.image_token_range(self.site, call)
        coefficients = self.patch.edit.coefficients(self.path, x[:, tokens], call.grid,
                                                    self.patch.rows(options, x.shape[0]))
        if coefficients is None:
            return out
        moved = image_of(self.patch.edit.vector(self.path, x))[:rows]
        out[:, tokens, :rows].addcmul_(coefficients[..., None], moved)  # the linear's own fresh output
        return out


def edits_on(model_options: dict) -> list:
    """The DirectionEdits that Apply Direction nodes put on a model (read by the Asyrp sampler)."""
    options = model_options.get("transformer_options", {})
    patches = options.get("patches", {})
    return [p.edit for key in ("attn1_patch", "output_block_patch") for p in patches.get(key, [])
            if isinstance(p, _Patch)] + [shift.patch.edit for _, shift in host.dit.shifts_on(model_options)
                                         if isinstance(shift, DitShift)]


class ApplyDirection:
    DESCRIPTION = (
        "Returns a patched copy of the MODEL (the input is never changed) that adds one direction of the "
        "set at its sites (self-attention inputs, or h-space) while sampling is inside the timestep range. "
        "alpha is the shift length in units of the site's typical token norm, so the same value means the "
        "same strength at every layer. Chain several to combine edits; give alpha_list to render a sweep.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The patched model; feed it to KSampler or SamplerCustom, or to a guider sampling with "
                       "the Asyrp Sampler (needed for h-space edits).",)

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
                      "1 a whole token); for a pair's direction, a fraction of the pair's difference (1 the whole "
                      "of it). Negative reverses the edit; 0 leaves the model exactly as it was."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                              "Where the edit starts, in model time (0 = first step, highest noise), as in "
                              "ConditioningSetTimestepRange."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                            "Where the edit ends, in model time (1 = last step)."}),
            "apply_to": (list(host.PASSES), {"default": "both", "tooltip":
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
        alphas = parse_numbers(alpha_list, "alpha_list") if alpha_list.strip() else [finite("alpha", alpha)]
        start_percent, end_percent = finite("start_percent", start_percent), finite("end_percent", end_percent)
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}); "
                             f"the edit range must start before it ends")
        sites = host.select_layers(list(directions.sites), layer, input_name="layer")
        smallest = min(directions.sites[s].count for s in sites)
        if index >= smallest:
            raise ValueError(f"index: {index} is out of range; this set has {smallest} directions per site "
                             f"(0 to {smallest - 1})")
        check_made_for(model, directions, sites)
        if mask is not None:
            mask = as_mask_batch(mask)
            if len(alphas) > 1 and mask.shape[0] > 1 and len(alphas) != mask.shape[0]:
                raise ValueError(f"mask: {mask.shape[0]} masks but alpha_list has {len(alphas)} values; give one "
                                 f"mask, or one per image")
        sampling = host.model_sampling(model)
        edit = DirectionEdit({s: shift_unit(directions, s, index) for s in sites}, alphas,
                             sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent), mask)
        patched = model.clone()
        attention_sites = {host.block_key(s): s for s in sites if site_kind(s) == ATTN1}
        if attention_sites:
            patched.set_model_attn1_patch(Attn1Patch(edit, host.PASSES[apply_to], attention_sites))
        if HSPACE in sites:
            patched.set_model_output_block_patch(HSpacePatch(edit, host.PASSES[apply_to]))
        transformer_sites = [s for s in sites if site_kind(s) == DIT]
        if transformer_sites:
            patch, blocks = _Patch(edit, host.PASSES[apply_to]), host.dit.sites(model)
            host.dit.add_shifts(patched, [(blocks[path], DitShift(patch, path, blocks[path]))
                                          for path in transformer_sites])
        return (patched,)


def shift_unit(directions, site: str, index: int):
    """The shift alpha 1 makes (times the site's RMS token norm): the unit direction, or for a pair's
    direction the pair's whole difference (its gain, the natural strength)."""
    vector = directions.sites[site].vectors[index].clone()
    return vector * directions.sites[site].gains[index] if directions.params.get("alpha_unit") == "pair" else vector


def as_mask_batch(mask):
    """A MASK as [M, H, W] float on the CPU: [H, W], [M, H, W], [M, 1, H, W] and [M, H, W, 1] are accepted."""
    if mask.ndim == 4 and 1 in (mask.shape[1], mask.shape[-1]):
        mask = mask.squeeze(1) if mask.shape[1] == 1 else mask.squeeze(-1)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise ValueError(f"mask: expected a MASK of shape [H, W] or [batch, H, W], got {list(mask.shape)}")
    finite_tensor("mask", mask, "mask's values")
    return mask.detach().float().cpu()


def check_made_for(model, directions, sites) -> None:
    """The set must come from this model's family and layer widths (its fingerprint; a fine-tune or LoRA of
    the same base shares it), and every chosen site must exist here with the set's width."""
    made_for, here = directions.model.get("family", "another model"), host.family(model)
    if made_for != here:
        raise ValueError(f"directions: made for {made_for} but this model is {here}; use directions discovered "
                         f"on this model (or one of its fine-tunes)")
    widths = None
    for site in sites:
        kind, width = site_kind(site), directions.sites[site].width
        if kind in (ATTN1, DIT):
            widths = widths or host.site_widths(model)
            found = widths.get(site)
        else:
            found = host.hspace_width(model)
        if found is None:
            raise ValueError(f"directions: {site} does not exist in this {here} model; use directions discovered "
                             f"on this model")
        if found != width:
            raise ValueError(f"directions: {site} has width {found} in this {here} model but {width} in the set; "
                             f"use directions discovered on this model")
    if directions.model.get("fingerprint") != host.fingerprint(model):
        raise ValueError(f"directions: made for a {made_for} model with other layer widths than this one (fingerprint "
                         f"{directions.model.get('fingerprint')} vs {host.fingerprint(model)}); use directions "
                         f"discovered on this model")


NODE_CLASS_MAPPINGS = {"ApplyDirection": ApplyDirection}
NODE_DISPLAY_NAME_MAPPINGS = {"ApplyDirection": "Apply Direction"}
