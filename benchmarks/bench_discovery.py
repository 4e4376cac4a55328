"""Discovery speed: all attn1 layers of SD1.5- and SDXL-sized UNets (random fp16 weights), count=10.

Measured side by side in one run: the node's path (weights read through the patcher, block
Krylov per layer) and a naive baseline on the same weights that forms M = J^T J and runs a full
eigendecomposition per layer. Each timed run of the node uses a different token_variance so that
its result cache never answers. The baseline's eigenvalues are the exact squared gains, so the
node's accuracy comes out of the same run: the largest relative gain error over all layers
(random weights have a flat spectrum, the hardest case for the iterative path).
"""
import torch

from benchmarks.common import PeakRss, arguments, report, start_host, timed

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
            layers, key_patches = unet_host.attention_layers(patcher), patcher.get_key_patches("diffusion_model.")
            exact_gains = {}
            for path, module in layers.items():
                weights = unet_host.read_attention_weights(patcher, key_patches, path, module.heads, device)
                with torch.no_grad():
                    apply, _ = attention.shift_operator(weights, "whitened")
                    jacobian = apply(torch.eye(weights.width, device=device))
                    eigenvalues = torch.linalg.eigh(jacobian.T @ jacobian).eigenvalues
                exact_gains[path] = eigenvalues.flip(0)[:COUNT].clamp(min=0).sqrt().cpu()
            synchronize()
            return exact_gains
        return run

    figures = {"device": str(device), "threads": torch.get_num_threads(), "count": COUNT,
               "weights_dtype": "float16"}
    for name, family in (("sd15", "sd15"), ("sdxl", "sdxl")):
        patcher = build_unet(family, dtype=torch.float16, full_size=True)
        with torch.no_grad():
            figures[f"{name}_layers"] = len(unet_host.attention_layers(patcher))
            with PeakRss() as memory:
                seconds, (found, _) = timed(discover(patcher), REPEATS)
                figures[f"{name}_all_layers_s"] = round(seconds, 4)
            seconds, exact = timed(full_eigh(patcher), REPEATS)
            figures[f"{name}_full_eigh_s"] = round(seconds, 4)
        errors = [float(((found.sites[path].gains.float() - gains).abs() / gains).max()) for path, gains in exact.items()]
        figures[f"{name}_max_relative_gain_error"] = round(max(errors), 4)
        figures[f"{name}_speedup"] = round(figures[f"{name}_full_eigh_s"] / figures[f"{name}_all_layers_s"], 1)
        figures[f"{name}_extra_peak_rss_mb"] = round(memory.extra_mb, 1)
        del patcher
    figures["one_1280_layer_f32_weights_mb"] = 4 * 1280 * 1280 * 4 / 2 ** 20
    report(figures, args.json)


if __name__ == "__main__":
    main()
