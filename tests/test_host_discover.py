"""Host layer: Discover Attention Eigendirections on real host models, graphs, patches and dtypes."""
import hashlib
import re

import pytest
import torch
from directions_testing import assert_cancel_stops, progress_updates
from graphs import discover_and_save

from semantic_directions.directions.attention import AttentionWeights, attention_directions
from semantic_directions.directions.fileformat import load_directions

PATH_7 = "input_blocks.7.1.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def tiny(host):
    """build_unet from the test-only nodes, and the pack's node class as the host registered it."""
    from harness.test_nodes.unets import build_unet
    return build_unet, host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]()


def module_weights(patcher, path, extra=None) -> AttentionWeights:
    """A layer's weights straight from the module (plus ``extra`` deltas), dequantized to float32."""
    module = patcher.model.diffusion_model.get_submodule(path)
    tensors = [getattr(module, name).weight.float() if name != "to_out" else module.to_out[0].weight.float()
               for name in ("to_q", "to_k", "to_v", "to_out")]
    for index, delta in (extra or {}).items():
        tensors[index] = tensors[index] + delta
    return AttentionWeights(*tensors, heads=module.heads)


def parameter_hashes(patcher):
    return {name: hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, p in patcher.model.state_dict().items()}


def test_graph_discovers_every_layer_and_saves_it(host):
    outputs = host.run(discover_and_save("tiny/all"))
    dset = load_directions(host.models_dir("directions") / "tiny" / "all.safetensors")
    assert len(dset.sites) == 16 and dset.method == "attention-whitened"
    assert dset.model["family"] == "SD15"
    assert dset.params == {"layers": "all", "count": 4, "method": "whitened", "token_variance": 1.0}
    for site in dset.sites.values():  # float32 SVD vectors: orthonormal to about width * eps (measured: 1.4e-6)
        assert site.count == 4 and torch.allclose(site.vectors @ site.vectors.T, torch.eye(4), atol=1e-5)
        assert (site.gains[:-1] >= site.gains[1:]).all()
    assert len(outputs["p"]["images"]) == 1


def test_directions_are_those_of_the_layer_weights(host, tiny):
    build_unet, node = tiny
    patcher = build_unet("sd15", seed=3)
    for method in ("whitened", "value", "qkv-stack"):
        dset, spectrum = node.discover(patcher, "input_blocks.7, middle_block", 5, method, 1.0)
        assert list(dset.sites) == [PATH_7, "middle_block.1.transformer_blocks.0.attn1"]
        expected, gains = attention_directions(module_weights(patcher, PATH_7), 5, method)
        # the node runs the same function on the same float32 weights: identical results, as in the LoRA, lowvram
        # and low-precision tests below
        assert torch.equal(dset.sites[PATH_7].vectors, expected)
        assert torch.allclose(dset.sites[PATH_7].gains, gains, rtol=1e-5)
        assert dset.sites[PATH_7].vectors.device.type == "cpu"
        assert spectrum.shape[0] == 1 and spectrum.shape[-1] == 3 and spectrum.std() > 0


def test_lora_patches_are_read_through_the_patcher_and_weights_never_change(host, tiny):
    import comfy.model_management
    build_unet, node = tiny
    base = build_unet("sd15", seed=4)
    before = parameter_hashes(base)
    key = f"diffusion_model.{PATH_7}.to_v.weight"
    delta = 0.5 * torch.randn(base.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(9))
    lora = base.clone()
    lora.add_patches({key: (delta,)}, strength_patch=1.0)
    expected_base = attention_directions(module_weights(base, PATH_7), 4)
    expected_lora = attention_directions(module_weights(base, PATH_7, {2: delta}), 4)

    comfy.model_management.load_models_gpu([lora])  # the LoRA'd clone now sits merged in the shared modules
    assert parameter_hashes(base) != before, "the LoRA clone should be merged into the live weights now"
    for patcher, expected in ((base, expected_base), (lora, expected_lora)):
        dset, _ = node.discover(patcher, "input_blocks.7", 4, "whitened", 1.0)
        assert torch.equal(dset.sites[PATH_7].vectors, expected[0])
        assert torch.allclose(dset.sites[PATH_7].gains, expected[1], rtol=1e-4)
    comfy.model_management.unload_all_models()
    assert parameter_hashes(base) == before


def test_no_weight_changes(host, tiny):
    build_unet, node = tiny
    patcher = build_unet("sd15", seed=5)
    before = parameter_hashes(patcher)
    node.discover(patcher, "all", 10, "whitened", 1.0)
    node.discover(patcher, "all", 3, "qkv-stack", 1.0)
    assert parameter_hashes(patcher) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_models_are_dequantized_for_the_math(host, tiny, dtype):
    build_unet, node = tiny
    patcher = build_unet("sd15", seed=6, dtype=dtype)
    assert patcher.model.diffusion_model.get_submodule(PATH_7).to_q.weight.dtype == dtype
    dset, _ = node.discover(patcher, "input_blocks.7", 4, "whitened", 1.0)
    expected = attention_directions(module_weights(patcher, PATH_7), 4)
    assert torch.equal(dset.sites[PATH_7].vectors, expected[0])
    reference = attention_directions(module_weights(build_unet("sd15", seed=6), PATH_7), 4)
    agreement = (dset.sites[PATH_7].vectors * reference[0]).sum(dim=1)
    assert agreement[0] > (0.99 if dtype != torch.float8_e4m3fn else 0.9)


def test_lowvram_loaded_model_gives_the_patched_directions(host, tiny):
    """In lowvram mode the host merges patches on the fly; the live weights stay unpatched."""
    build_unet, node = tiny
    base = build_unet("sd15", seed=7)
    key = f"diffusion_model.{PATH_7}.to_q.weight"
    delta = 0.5 * torch.randn(base.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(10))
    lora = base.clone()
    lora.add_patches({key: (delta,)}, strength_patch=1.0)
    lora.load(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        assert lora.model.model_lowvram
        dset, _ = node.discover(lora, "input_blocks.7", 4, "whitened", 1.0)
        expected = attention_directions(module_weights(base, PATH_7, {0: delta}), 4)
        assert torch.equal(dset.sites[PATH_7].vectors, expected[0])
    finally:
        lora.detach()


def test_results_are_cached_per_model_patches_and_parameters(host, tiny):
    build_unet, node = tiny
    patcher = build_unet("sd15", seed=8)
    first, _ = node.discover(patcher, "all", 4, "whitened", 1.0)
    assert node.discover(patcher, "all", 4, "whitened", 1.0)[0] is first
    assert node.discover(patcher.clone(), "all", 4, "whitened", 1.0)[0] is first
    assert node.discover(patcher, "all", 4, "value", 1.0)[0] is not first
    patched = patcher.clone()
    key = f"diffusion_model.{PATH_7}.to_k.weight"
    patched.add_patches({key: (torch.ones_like(patcher.model.state_dict()[key]),)})
    changed, _ = node.discover(patched, "all", 4, "whitened", 1.0)
    assert changed is not first
    assert not torch.allclose(changed.sites[PATH_7].vectors, first.sites[PATH_7].vectors)


def test_progress_is_reported_per_layer_and_cancelling_stops(host, tiny):
    build_unet, node = tiny
    patcher = build_unet("sd15", seed=11)
    threads = torch.get_num_threads()
    with progress_updates() as updates:
        node.discover(patcher, "all", 2, "value", 1.0)
        assert updates[-1] == (16, 16) and len(updates) == 16
        assert torch.get_num_threads() == threads  # the layers ran one per core; the host's setting is back
        assert_cancel_stops(lambda: node.discover(patcher, "all", 2, "whitened", 1.0))
        assert len(updates) == 17 and torch.get_num_threads() == threads


def test_bad_inputs_get_clear_errors(host, tiny):
    build_unet, node = tiny
    patcher = build_unet("sd15", seed=0)
    with pytest.raises(ValueError, match=r"layers: 'output_blocks\.1' names none of the layers here; .*"
                                         r"among: input_blocks\.1, .*output_blocks\.11$"):
        node.discover(patcher, "input, output_blocks.1", 4, "whitened", 1.0)
    assert node.discover(patcher, "input, middle_block.1", 1, "value", 1.0)[0].sites.keys() == {
        f"input_blocks.{i}.1.transformer_blocks.0.attn1" for i in (1, 2, 4, 5, 7, 8)} | {
        "middle_block.1.transformer_blocks.0.attn1"}
    with pytest.raises(ValueError, match=r"count: 40 is more than the width of .*\(32\)"):
        node.discover(patcher, "all", 40, "whitened", 1.0)


def test_a_weight_the_host_leaves_out_is_named(host, tiny, monkeypatch):
    """Newer hosts' get_key_patches (0.38) skip weights that are not tensors: a layer missing one is refused by
    name, not with a KeyError."""
    build_unet, node = tiny
    patcher = build_unet("sd15", seed=0)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    everything = patcher.get_key_patches
    monkeypatch.setattr(patcher, "get_key_patches", lambda *a, **k: {
        name: value for name, value in everything(*a, **k).items() if name != key})
    with pytest.raises(ValueError, match=rf"^model: the host gives no weight tensor for {re.escape(key)}, "):
        node.discover(patcher, "input_blocks.1", 2, "whitened", 1.0)


def sd3_with_layer_norms():
    """A tiny SD3 whose attention normalises q and k with LayerNorm (qk_norm 'ln'), which the math does not cover."""
    import comfy.supported_models

    from harness.test_nodes.dits import SD35_DIT, TINY_SD3
    config = comfy.supported_models.SD3({**SD35_DIT, **TINY_SD3, "qk_norm": "ln", "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({})


def unet_without_attention():
    import comfy.supported_models

    from harness.test_nodes.unets import SD15_UNET
    config = comfy.supported_models.SD15(dict(
        SD15_UNET, model_channels=32, context_dim=32, transformer_depth=[0] * 8, transformer_depth_middle=0,
        transformer_depth_output=[0] * 12, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({})


@pytest.mark.parametrize("build, message", [
    (unet_without_attention, "model: no self-attention layers found in this SD15 model; the pack supports SD1.x, "
                             "SD2.x, SDXL .*; Flux, Flux.2, Chroma, SD3 and Qwen-Image \\(not other models yet\\)"),
    (sd3_with_layer_norms, "model: its attention normalises queries and keys with LayerNorm, which the pack's "
                           "attention math does not cover"),
])
def test_models_without_supported_self_attention_are_refused_by_name(host, tiny, build, message):
    import comfy.model_patcher
    patcher = comfy.model_patcher.ModelPatcher(build(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=message) as error:
        tiny[1].discover(patcher, "all", 4, "whitened", 1.0)
    assert "\n" not in str(error.value)


def test_sdxl_structure_has_70_layers(host, tiny):
    build_unet, node = tiny
    dset, _ = node.discover(build_unet("sdxl"), "all", 2, "value", 1.0)
    assert len(dset.sites) == 70 and dset.model["family"] == "SDXL"
    assert list(dset.sites)[0] == "input_blocks.4.1.transformer_blocks.0.attn1"
