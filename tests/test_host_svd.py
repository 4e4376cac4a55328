"""Host layer: SVD Latent Attribute, Explore and Analysis in the real host's graphs and progress bar."""
import numpy as np
import pytest
import torch
from directions_testing import assert_cancel_stops, assert_float32_close, progress_updates
from directions_testing import saved_image as saved

from harness.host import NodeFailed

STEPS, SPLIT = 10, 4


def partial(conditioning, end=SPLIT):
    """KSamplerAdvanced to ``end`` of STEPS with the leftover noise kept (seed 0, shared by the pair)."""
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["m", 0], "add_noise": "enable", "noise_seed": 0, "steps": STEPS, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": "normal", "positive": [conditioning, 0], "negative": [conditioning, 0],
        "latent_image": ["lat", 0], "start_at_step": 0, "end_at_step": end, "return_with_leftover_noise": "enable"}}


def resume(latent, conditioning="src_c"):
    """KSamplerAdvanced from SPLIT to the end, add_noise disabled, with the given prompt."""
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["m", 0], "add_noise": "disable", "noise_seed": 0, "steps": STEPS, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": "normal", "positive": [conditioning, 0], "negative": [conditioning, 0],
        "latent_image": [latent, 0], "start_at_step": SPLIT, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}


def decode_and_save(nodes: dict, latent: str, name: str):
    nodes[f"dec_{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": [latent, 0], "vae": ["v", 0]}}
    nodes[f"save_{name}"] = {"class_type": "SaveImage", "inputs": {"images": [f"dec_{name}", 0],
                                                                   "filename_prefix": f"svd_{name}"}}


def attribute_graph(target_weight=1.0, source_weight=1.0, target_values_weight=0.1, source_values_weight=0.1,
                    source_shape=64):
    """A prompt pair -> two partial samplings -> SVD Latent Attribute -> resumed sampling -> decode -> save,
    beside the unedited source and target renders, and the Analysis of the source's trajectory."""
    nodes = {
        "m": {"class_type": "TinyUNetLoader", "inputs": {"family": "sd15", "model_channels": 32, "seed": 0}},
        "v": {"class_type": "TinyVAELoader", "inputs": {"seed": 0}},
        "src_c": {"class_type": "TinyConditioning", "inputs": {"seed": 1, "context_dim": 32, "tokens": 77}},
        "tgt_c": {"class_type": "TinyConditioning", "inputs": {"seed": 3, "context_dim": 32, "tokens": 77}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "src_lat": {"class_type": "EmptyLatentImage", "inputs": {"width": source_shape, "height": 64,
                                                                 "batch_size": 1}},
        "src": partial("src_c"),
        "tgt": partial("tgt_c"),
        "attr": {"class_type": "SVDLatentAttribute", "inputs": {
            "source": ["src", 0], "target": ["tgt", 0], "k": 4, "m": 2, "target_weight": target_weight,
            "source_weight": source_weight, "target_values_weight": target_values_weight,
            "source_values_weight": source_values_weight, "iterations": 300, "seed": 0, "keep_rest": True}},
        "edited": resume("attr"),
        "plain": resume("src"),
        "target": resume("tgt", "tgt_c"),
        "early": partial("src_c", 2),
        "late": partial("src_c", 7),
        "b1": {"class_type": "LatentBatch", "inputs": {"samples1": ["early", 0], "samples2": ["src", 0]}},
        "b2": {"class_type": "LatentBatch", "inputs": {"samples1": ["b1", 0], "samples2": ["late", 0]}},
        "analysis": {"class_type": "SVDLatentAnalysis", "inputs": {"latents": ["b2", 0], "k": 3}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["analysis", 0]}},
    }
    if source_shape != 64:
        nodes["src"]["inputs"]["latent_image"] = ["src_lat", 0]
    for name in ("edited", "plain", "target"):
        decode_and_save(nodes, name, name)
    return nodes


def test_attribute_graph_moves_the_image_towards_the_target_prompt(host):
    """Every output node produces output; the source-only fit reproduces the unedited render; the
    target-only fit moves the render towards the target prompt's; the default lies in between."""
    def renders(**weights):
        outputs = host.run(attribute_graph(**weights), cached=False)
        assert outputs["show"]["images"], "the analysis plot was not shown"
        return {name: saved(host, outputs, f"save_{name}") for name in ("edited", "plain", "target")}

    source_only = renders(target_weight=0.0, target_values_weight=0.0, source_values_weight=0.0)
    plain, target = source_only["plain"], source_only["target"]
    assert np.abs(source_only["edited"] - plain).max() <= 2  # uint8 rounding only (measured: 1, on 1% of pixels)

    def distance_to_target(image):
        return float(np.abs(image - target).mean())
    target_only = renders(source_weight=0.0, target_values_weight=0.0, source_values_weight=0.0)["edited"]
    default = renders()["edited"]
    print("mean |pixel - target render|: plain", distance_to_target(plain), "default", distance_to_target(default),
          "target only", distance_to_target(target_only))
    assert distance_to_target(target_only) < distance_to_target(default) < distance_to_target(plain)


def test_mismatched_latents_fail_with_one_line(host):
    with pytest.raises(NodeFailed, match=r"target: shape \[1, 4, 8, 8\] differs from the source's \[1, 4, 8, 12\]"):
        host.run(attribute_graph(source_shape=96))


@pytest.fixture(scope="module")
def nodes(host):
    registry = host.nodes.NODE_CLASS_MAPPINGS
    return registry["SVDLatentAttribute"](), registry["SVDLatentExplore"](), registry["SVDLatentAnalysis"]()


def latent(seed, shape=(1, 4, 16, 16)):
    return {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(seed))}


def test_explore_node(nodes):
    explore = nodes[1]
    source = {**latent(0, (2, 4, 16, 16)), "batch_index": [3, 4], "noise_mask": torch.ones(1, 16, 16)}
    unchanged = explore.explore(source, 2, -1, 1.0)[0]
    assert torch.equal(unchanged["samples"], source["samples"]) and unchanged["batch_index"] == [3, 4]
    sweep = explore.explore(source, 0, 1, 1.0, factor_list="0, 1, 2")[0]
    assert sweep["samples"].shape == (6, 4, 16, 16) and "batch_index" not in sweep and "noise_mask" in sweep
    assert torch.equal(sweep["samples"][2:4], source["samples"])
    assert torch.equal(sweep["samples"][:, [0, 2, 3]], source["samples"].repeat(3, 1, 1, 1)[:, [0, 2, 3]])
    top = torch.linalg.svdvals(source["samples"][0, 1])[0]
    # the largest singular value itself: float32 SVD gets it to a few ulps of its own size
    assert_float32_close(torch.linalg.svdvals(sweep["samples"][4, 1]).max(), 2 * top)
    with pytest.raises(ValueError, match="factor_list: 'x' is not a number"):
        explore.explore(source, 0, -1, 1.0, factor_list="1,x")


def test_analysis_node(nodes):
    """Four channels: a 2 x 2 grid of spectrum panels (256 px each) with one line per latent, blue the first and
    red the last, beside the distance panel (512 px, 40 between) with one line per channel in its colour."""
    analysis = nodes[2]
    image = analysis.analyse(latent(1, (3, 4, 16, 16)), 4)[0]
    assert image.shape == (1, 532, 2 * 256 + 40 + 2 * 256, 3)
    pixels = (image[0] * 255).round().to(torch.uint8)

    def drawn(region, colour):
        return bool((region == torch.tensor(colour, dtype=torch.uint8)).all(-1).any())
    spectra, distances = pixels[:, :512], pixels[:, 552:]
    for panel in (spectra[:256, :256], spectra[:256, 256:], spectra[256:512, :256], spectra[256:512, 256:]):
        assert drawn(panel, (40, 60, 240)) and drawn(panel, (140, 60, 140)) and drawn(panel, (240, 60, 40))
    for colour in ((52, 110, 235), (40, 170, 80), (235, 120, 40), (170, 60, 200)):
        assert drawn(distances, colour) and not drawn(spectra, colour)
    with pytest.raises(ValueError, match="latents: expected at least 2 latents"):
        analysis.analyse(latent(1), 4)
    with pytest.raises(ValueError, match="k: 17 is outside 0 to 16"):
        analysis.analyse(latent(1, (2, 4, 16, 16)), 17)


def test_attribute_reports_progress_and_stops_on_cancel(nodes):
    attribute, source, target = nodes[0], latent(2), latent(3)
    with progress_updates() as updates:
        result = attribute.transfer(source, target, 4, 2, 1.0, 1.0, 0.1, 0.1, 50, 0, True)[0]
        assert result["samples"].shape == source["samples"].shape and updates[-1] == (50, 50)
        assert_cancel_stops(lambda: attribute.transfer(source, target, 4, 2, 1.0, 1.0, 0.1, 0.1, 50, 0, True))
