"""Discover Attention Eigendirections: directions from a UNet's self-attention weights alone."""
import concurrent.futures
import contextlib
import weakref

import torch

import comfy.model_management
import comfy.utils

from ..directions.attention import METHODS, attention_directions
from ..directions.directionset import DirectionSet, SiteDirections
from . import host
from .common import CATEGORY, DIRECTIONS, all_finite, finite
from .plots import gain_spectrum_image

_CACHE_PER_MODEL = 8
_results = weakref.WeakKeyDictionary()


class DiscoverAttentionEigendirections:
    DESCRIPTION = (
        "Finds editing directions from the weights of the model's self-attention layers alone (a UNet's attn1 "
        "layers, a Flux, SD3 or Qwen-Image transformer's image attention): no images, no training. For each "
        "layer, the unit shifts of its input that move its output most (top right singular vectors of the "
        "layer's combined query-key-value matrix), strongest first, with their gains. LoRAs on the MODEL are "
        "taken into account; weights are never changed. "
        f"Supports {host.SUPPORTED_FAMILIES}.")
    CATEGORY = CATEGORY
    FUNCTION = "discover"
    RETURN_TYPES = (DIRECTIONS, "IMAGE")
    RETURN_NAMES = ("directions", "spectrum")
    OUTPUT_TOOLTIPS = ("count directions per layer, for Apply Direction or Save Directions.",
                       "Each layer's gains relative to its first: the elbow shows how many are worth trying.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to analyse; a LoRA'd model gives the LoRA'd directions."}),
            "layers": ("STRING", {"default": "all", "tooltip":
                       "all; input, middle or output (UNets); double or single (Flux); joint (SD3); transformer "
                       "(Qwen-Image); or "
                       "comma-separated layer "
                       "paths or prefixes, e.g. 'input_blocks.7, middle_block' or 'double_blocks.3'."}),
            "count": ("INT", {"default": 10, "min": 1, "max": 1280, "tooltip": "Directions per layer."}),
            "method": (list(METHODS), {"default": "whitened", "tooltip":
                       "whitened: value path plus the keys' tilt of attention, assuming whitened tokens "
                       "(the paper's combined matrix). value: value path only. qkv-stack: SeFa-style "
                       "eigenvectors of Wq'Wq + Wk'Wk + Wv'Wv."}),
            "token_variance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05, "tooltip":
                               "whitened only: s^2 in c = s^2 / sqrt(head width), the assumed variance of "
                               "the layer's input tokens. 1 is a LayerNorm output's; 0 equals 'value'. On Flux "
                               "(QK-normed attention) the tokens' scale cancels: any value above 0 gives nearly "
                               "the same directions (only the projections' biases weigh it)."}),
        }}

    def discover(self, model, layers, count, method, token_variance):
        finite("token_variance", token_variance)
        sites = host.attention_sites(model)
        chosen = host.select_layers(list(sites), layers)
        widths = {path: site.width for path, site in sites.items()}
        too_wide = [p for p in chosen if count > widths[p]]
        if too_wide:
            raise ValueError(f"count: {count} is more than the width of {too_wide[0]} "
                             f"({widths[too_wide[0]]}); lower it")
        device = comfy.model_management.get_torch_device()
        params = {"layers": layers.strip() or "all", "count": count, "method": method,
                  "token_variance": token_variance}
        key = (model.patches_uuid, params["layers"], count, method, token_variance, str(device))
        cache = _results.setdefault(model.model, {})
        dset = cache.pop(key, None) or self._compute(model, sites, chosen, device, params)
        cache[key] = dset  # most recently used last
        while len(cache) > _CACHE_PER_MODEL:
            cache.pop(next(iter(cache)))
        spectrum = gain_spectrum_image({name: site.gains.tolist() for name, site in dset.sites.items()})
        return (dset, spectrum)

    @staticmethod
    def _compute(model, sites, chosen, device, params) -> DirectionSet:
        key_patches = model.get_key_patches("diffusion_model.")
        found = discover_sites({path: sites[path] for path in chosen}, key_patches, device, params,
                               comfy.utils.ProgressBar(len(chosen)))
        return DirectionSet(sites=found, method=f"attention-{params['method']}", params=params,
                            model=host.made_for(model))


def discover_sites(sites: dict, key_patches: dict, device, params: dict, progress=None) -> dict:
    """{path: SiteDirections} for ``sites`` ({path: host.AttentionSite}), their weights read from ``key_patches``,
    a pool of layers at a time (see :func:`layer_pool`); the progress bar advances a layer at a time and
    cancelling stops it."""
    @torch.no_grad()
    def layer_directions(path):
        weights = sites[path].read(key_patches, device)
        tensors = (weights.q, weights.k, weights.v, weights.out, weights.q_norm, weights.k_norm, weights.q_bias,
                   weights.k_bias, weights.v_bias)
        if not all(all_finite(t) for t in tensors if t is not None):
            raise ValueError(f"model: the attention weights of {path} hold NaN or infinite values; load a "
                             f"working checkpoint (or check the LoRA's strength)")
        vectors, gains = attention_directions(weights, params["count"], params["method"], params["token_variance"])
        return SiteDirections(vectors.float().cpu(), gains.float().cpu())
    found = {}
    with layer_pool(device) as pool:
        futures = {path: pool.submit(layer_directions, path) for path in sites}
        try:
            for path, future in futures.items():
                found[path] = future.result()
                if progress is not None:
                    progress.update(1)
                comfy.model_management.throw_exception_if_processing_interrupted()
        finally:
            for future in futures.values():
                future.cancel()
    return found


@contextlib.contextmanager
def layer_pool(device):
    """Workers for the layers. On the CPU, one single-threaded layer per core: a layer's products are
    too small to keep two threads busy, and its Rayleigh-Ritz steps run on one (SDXL's 70 layers:
    about 1.5x faster on two cores than one layer at a time on two threads)."""
    threads = torch.get_num_threads()
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        torch.set_num_threads(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(threads if on_cpu else 1) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


NODE_CLASS_MAPPINGS = {"DiscoverAttentionEigendirections": DiscoverAttentionEigendirections}
NODE_DISPLAY_NAME_MAPPINGS = {"DiscoverAttentionEigendirections": "Discover Attention Eigendirections"}
