"""Discovery speed and accuracy: all attn1 layers of SD1.5- and SDXL-sized UNets (random fp16 weights), count=10.

Measured side by side in one run, in turns (benchmarks.common.timed_in_turns: each round runs both, the order
alternating; best of three each): the node's path (weights read through the patcher, block Krylov per layer) and
a naive baseline on the same weights that forms M = J^T J and runs a full eigendecomposition per layer. Each
timed run of the node uses a different token_variance so that its result cache never answers.

End to end (SD1.5): the same UNet saved with CLIP-L and a VAE by the host's own save path and loaded by its
CheckpointLoaderSimple's loader, the node timed on that MODEL beside the library's math alone on the same
weights already read, so that reading and converting them is the difference.

Accuracy, against a dense float64 SVD of J in the same run, on every layer twice: the random
weights as they are (a flat spectrum, the hardest case for the iterative path) and with W_v's
singular values made to decay over two decades (as trained weights' spectra fall off). Per
family and spectrum: the worst relative gain error, the smallest captured energy (sum of the
found gains^2 over the true top-k sum), and the smallest principal-angle cosine between the
found and the true top-k subspaces over the layers whose gap sigma_k / sigma_k+1 exceeds 1%.
"""
import tempfile
from pathlib import Path

import torch

from benchmarks.common import PeakRss, arguments, full_eigh_gains, report, start_host, timed, timed_in_turns

COUNT, REPEATS = 10, 3


def main():
    args = arguments(__doc__)
    host = start_host(args.device)
    from harness.test_nodes.unets import build_unet
    from semantic_directions.directions import attention
    from semantic_directions.nodes import host as unet_host
    node = host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]()
    import comfy.model_management
    device = comfy.model_management.get_torch_device()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def discover(patcher):
        def run(i):
            result = node.discover(patcher, "all", COUNT, "whitened", 1.0 + 1e-4 * (REPEATS - 1 - i))  # last: 1
            synchronize()
            return result
        return run

    def full_eigh(patcher):
        def run(_):
            exact_gains = full_eigh_gains(unet_host.attention_sites(patcher),
                                          patcher.get_key_patches("diffusion_model."),
                                          device, COUNT)
            synchronize()
            return exact_gains
        return run

    figures = {"device": str(device), "threads": torch.get_num_threads(), "count": COUNT,
               "weights_dtype": "float16"}
    for name, family in (("sd15", "sd15"), ("sdxl", "sdxl")):
        patcher = build_unet(family, dtype=torch.float16, full_size=True)
        with torch.no_grad():
            figures[f"{name}_layers"] = len(unet_host.attention_sites(patcher))
            seconds, results = timed_in_turns({"node": discover(patcher), "eigh": full_eigh(patcher)}, REPEATS)
            (found, _), exact = results["node"], results["eigh"]
            figures[f"{name}_all_layers_s"] = round(seconds["node"], 4)
            figures[f"{name}_full_eigh_s"] = round(seconds["eigh"], 4)
            with PeakRss() as memory:
                discover(patcher)(REPEATS)  # once more, alone, for its memory
        errors = [float(((found.sites[path].gains.float() - gains).abs() / gains).max())
                  for path, gains in exact.items()]
        figures[f"{name}_max_relative_gain_error"] = round(max(errors), 4)
        figures.update(accuracy(name, patcher, unet_host, attention, device))
        figures[f"{name}_speedup"] = round(figures[f"{name}_full_eigh_s"] / figures[f"{name}_all_layers_s"], 1)
        figures[f"{name}_extra_peak_rss_mb"] = round(memory.extra_mb, 1)
        if name == "sd15":
            figures.update(end_to_end(patcher, discover, attention, device))
        del patcher
    figures["one_1280_layer_f32_weights_mb"] = 4 * 1280 * 1280 * 4 / 2 ** 20
    figures["worst_gain_error"] = max(v for k, v in figures.items() if k.endswith("_worst_gain_error"))
    figures["min_captured_energy"] = min(v for k, v in figures.items() if k.endswith("_min_captured_energy"))
    report(figures, args.json)


def end_to_end(patcher, discover, attention, device) -> dict:
    """Discover as a user runs it: the UNet written with full-size CLIP-L and a TAESD-shaped VAE by the host's own
    comfy.sd.save_checkpoint (fp16) and loaded back by CheckpointLoaderSimple's loader; the node timed on the
    loaded MODEL (its weights read through the patcher and converted), beside the library's math alone on the same
    layers with their weights already read (float32, in the node's layer pool), so that reading and converting
    the weights is the difference."""
    import comfy.sd

    from harness.test_nodes.unets import build_clip, build_vae
    from semantic_directions.nodes import host as unet_host
    from semantic_directions.nodes.discover import layer_pool
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sd15_random.safetensors"
        comfy.sd.save_checkpoint(str(path), patcher, build_clip("sd15", 0, full_size=True, dtype=torch.float16),
                                 build_vae(0))
        load_s, model = timed(lambda _: comfy.sd.load_checkpoint_guess_config(str(path))[0], 1)
    key_patches = model.get_key_patches("diffusion_model.")
    layers = [site.read(key_patches, device) for site in unet_host.attention_sites(model).values()]

    def library(_):
        with torch.no_grad(), layer_pool(device) as pool:
            return list(pool.map(lambda weights: attention.attention_directions(weights, COUNT, "whitened"), layers))
    seconds, _ = timed_in_turns({"node": discover(model), "library": library}, REPEATS)
    node_s, library_s = seconds["node"], seconds["library"]
    return {"sd15_checkpoint_family": type(model.model.model_config).__name__,
            "sd15_checkpoint_load_s": round(load_s, 2), "sd15_checkpoint_node_s": round(node_s, 4),
            "sd15_library_math_s": round(library_s, 4)}


def decayed(weights, attention):
    """The layer with W_v's singular values scaled down over two decades."""
    u, values, vh = torch.linalg.svd(weights.v.double(), full_matrices=False)
    decay = torch.logspace(0, -2, values.numel(), dtype=torch.float64)
    v = (u @ torch.diag(values * decay) @ vh).to(weights.v.dtype)
    return attention.AttentionWeights(weights.q, weights.k, v, weights.out, weights.heads)


def accuracy(name, patcher, unet_host, attention, device) -> dict:
    """The iterative path against a dense float64 SVD of J, on every layer, flat and decaying spectra."""
    sites, key_patches = unet_host.attention_sites(patcher), patcher.get_key_patches("diffusion_model.")
    worst = {"random": [0.0, 1.0, 1.0], "decaying": [0.0, 1.0, 1.0]}  # gain error, energy, subspace cosine
    for site in sites.values():
        weights = site.read(key_patches, device)
        for spectrum, layer in (("random", weights), ("decaying", decayed(weights, attention))):
            with torch.no_grad():
                vectors, gains = attention.attention_directions(layer, COUNT, "whitened")
                apply, _ = attention.shift_operator(layer, "whitened")
                jacobian = apply(torch.eye(layer.width, device=device)).double()
            _, values, vh = torch.linalg.svd(jacobian)
            top = values[:COUNT]
            figures = worst[spectrum]
            figures[0] = max(figures[0], float(((gains.double() - top).abs() / top).max()))
            figures[1] = min(figures[1], float((gains.double() ** 2).sum() / (top ** 2).sum()))
            if values[COUNT - 1] / values[COUNT] > 1.01:
                figures[2] = min(figures[2], float(torch.linalg.svdvals(vh[:COUNT] @ vectors.double().T).min()))
    return {f"{name}_{spectrum}_{field}": round(value, 6) for spectrum, (error, energy, cosine) in worst.items()
            for field, value in (("worst_gain_error", error), ("min_captured_energy", energy),
                                 ("min_subspace_cosine_gap_over_1pct", cosine))}


if __name__ == "__main__":
    main()
