"""The example workflows: up to date with their descriptions, and run by the real host on the tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest
from directions_testing import psnr, write_test_photo
from directions_testing import saved_image as saved

from scripts.build_workflows import SDXL_CHECKPOINT, WORKFLOWS, build_all
from scripts.workflow_format import to_api

TINY_CHECKPOINT = ("TinyCheckpointLoader", {"seed": 0})
FLUX_SUBSTITUTES = {"UNETLoader": ("TinyDiTLoader", {"family": "flux", "seed": 0}),
                    "DualCLIPLoader": ("TinyFluxCLIPLoader", {"seed": 0}),
                    "VAELoader": ("TinyVAELoader", {"seed": 0, "latent_channels": 16})}
TINY_SIZE = 128  # pixels: a 16 x 16 latent, as many singular vectors as the SVD workflow takes
# Every step count a third of the workflow's, start and end steps alike (the SVD workflow's 12, 6 and 18 of 30
# become 4, 2 and 6 of 10; DDIM Invert and its sampling back keep equal counts): the graphs are under test here.
STEP_DIVISOR = 3
STEPPED = {"KSampler", "KSamplerAdvanced", "BasicScheduler", "DDIMInvert", "DirectionsFromSamples",
           "DirectionFromPromptPair", "DirectionFromExamplePair"}
TO_THE_END = 10000  # end_at_step's "to the last step"


def tiny_prompt(workflow: dict, registry) -> dict:
    """The workflow in API format with the tiny checkpoint of the same family substituted for checkpoint loading
    (and the tiny Flux, its text encoders and a 16-channel VAE for Flux's three loaders),
    empty latents shrunk to TINY_SIZE and steps divided by STEP_DIVISOR (image loading reads the tiny photo
    write_photo puts in input/)."""
    prompt = to_api(workflow, registry)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            family = "sdxl" if node["inputs"]["ckpt_name"] == SDXL_CHECKPOINT else "sd15"
            node["class_type"], node["inputs"] = TINY_CHECKPOINT[0], dict(TINY_CHECKPOINT[1], family=family)
        substitute = FLUX_SUBSTITUTES.get(node["class_type"])
        if substitute:
            node["class_type"], node["inputs"] = substitute
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["inputs"].update(width=TINY_SIZE, height=TINY_SIZE)
        if node["class_type"] in STEPPED:
            inputs = node["inputs"]
            inputs["steps"] = max(1, round(inputs["steps"] / STEP_DIVISOR))
            for name in ("start_at_step", "end_at_step"):
                if name in inputs and inputs[name] < TO_THE_END:
                    inputs[name] = round(inputs[name] / STEP_DIVISOR)
    return prompt


def output_nodes(prompt: dict, registry) -> list:
    return [node_id for node_id, node in prompt.items() if getattr(registry[node["class_type"]], "OUTPUT_NODE", False)]


def run_everything(host, workflow: dict) -> dict:
    """Runs the workflow on the tiny model; every output node must produce output."""
    registry = host.nodes.NODE_CLASS_MAPPINGS
    prompt = tiny_prompt(workflow, registry)
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            write_test_photo(host, node["inputs"]["image"])
    outputs = host.run(prompt, cached=False)
    silent = [f"{node_id} ({prompt[node_id]['class_type']})" for node_id in output_nodes(prompt, registry)
              if not any(outputs.get(node_id, {}).values())]
    assert output_nodes(prompt, registry) and not silent, f"output nodes without output: {silent}"
    return outputs


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))


def test_workflow_files_match_their_descriptions(host):
    built = build_all(host.nodes.NODE_CLASS_MAPPINGS)
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in WORKFLOWS.glob("*.json")}
    assert set(on_disk) == set(built), "run `make workflows` to write workflows/ again"
    for name, text in built.items():
        assert on_disk[name] == text, f"{name} is out of date: run `make workflows`"


def test_converter_reads_the_front_ends_own_saved_workflows(host):
    """The host's bundled templates were saved by the real front end: every one made only of
    installed nodes converts with each widget value accounted for. (SaveGLB is left out: the front
    end stores its 3D viewer's state as one more widget value.)"""
    import importlib.util
    registry = {name: cls for name, cls in host.nodes.NODE_CLASS_MAPPINGS.items() if name != "SaveGLB"}
    converted = 0
    for package in ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates_media_other",
                    "comfyui_workflow_templates_media_video"):
        spec = importlib.util.find_spec(package)
        if spec is None:
            continue
        for path in sorted((Path(spec.origin).parent / "templates").glob("*.json")):
            workflow = json.loads(path.read_text(encoding="utf-8"))
            if "nodes" not in workflow or workflow.get("definitions"):
                continue
            types = {node["type"] for node in workflow["nodes"]} - {"Note", "MarkdownNote"}
            if not types <= set(registry) or any(node.get("mode", 0) for node in workflow["nodes"]):
                continue
            to_api(workflow, registry)
            converted += 1
    print("front-end templates converted:", converted)
    assert converted >= 40


def vae_round_trip(host, image: str, loader=TINY_CHECKPOINT, vae_output=2):
    """The tiny VAE's encoding and decoding of an input image (the tiny checkpoint's, or another loader's
    output): the best a reconstruction can be."""
    outputs = host.run({
        "c": {"class_type": loader[0], "inputs": dict(loader[1])},
        "i": {"class_type": "LoadImage", "inputs": {"image": image}},
        "e": {"class_type": "VAEEncode", "inputs": {"pixels": ["i", 0], "vae": ["c", vae_output]}},
        "d": {"class_type": "VAEDecode", "inputs": {"samples": ["e", 0], "vae": ["c", vae_output]}},
        "s": {"class_type": "SaveImage", "inputs": {"images": ["d", 0], "filename_prefix": "round_trip"}},
    }, cached=False)
    return saved(host, outputs, "s")


def check_edit_real_image(host, workflow, outputs, model_loader="CheckpointLoaderSimple", prefix="semdir_",
                          vae=(TINY_CHECKPOINT, 2), min_change=10):
    """Workflow 2 (and 10, on Flux) inverts with the unedited model, and its reconstruction matches the photo as
    well as the VAE's own round trip allows; the edited image differs from it."""
    by_type = {}
    for node in workflow["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    model_link = next(slot["link"] for slot in by_type["DDIMInvert"][0]["inputs"] if slot["name"] == "model")
    origin = next(link[1] for link in workflow["links"] if link[0] == model_link)
    assert origin == by_type[model_loader][0]["id"], "DDIM Invert must take the unedited model"
    images = {node["widgets_values"][0]: saved(host, outputs, str(node["id"])) for node in by_type["SaveImage"]}
    reference = vae_round_trip(host, "example.png", *vae)
    reconstruction, edited = images[f"{prefix}reconstruction"], images[f"{prefix}edited"]
    print("workflow reconstruction PSNR against the VAE round trip:", psnr(reconstruction, reference),
          "edited:", psnr(edited, reference))
    assert psnr(reconstruction, reference) > 35
    assert np.abs(edited - reconstruction).max() > min_change


def check_save_and_reuse(host, workflow, outputs):
    """The reuse group starts muted: unmute it, as the note says, and run again; it loads the file."""
    for node in workflow["nodes"]:
        node["mode"] = 0
    outputs = run_everything(host, workflow)
    summary = next(node["id"] for node in workflow["nodes"] if node["type"] == "PreviewAny")
    assert "whitened" in str(outputs[str(summary)])


def check_discover_and_sweep(host, workflow, outputs):
    """The sweep's images share their noise: with every alpha 0 the five tiles of the grid are the same image."""
    for node in workflow["nodes"]:
        if node["type"] == "ApplyDirection":
            node["widgets_values"][-1] = "0, 0, 0, 0, 0"
        if node["type"] == "LabelledImageGrid":
            node["widgets_values"][0] = "0, 0, 0, 0, 0"
    tiles = grid_tiles(host, workflow, run_everything(host, workflow))
    differences = [float(np.abs(tile - tiles[0]).max()) for tile in tiles[1:]]
    # batched arithmetic may round one step apart; other noise differs by far more
    assert max(differences) <= 2, differences


def saved_by_prefix(host, workflow, outputs, prefix=None):
    """The image the first SaveImage node (or the one saving under ``prefix``) wrote."""
    node = next(node for node in workflow["nodes"]
                if node["type"] == "SaveImage" and prefix in (None, node["widgets_values"][0]))
    return saved(host, outputs, str(node["id"]))


def grid_tiles(host, workflow, outputs, count=5, prefix=None):
    """The tiles of the grid the first SaveImage node (or the one saving under ``prefix``) wrote."""
    grid = saved_by_prefix(host, workflow, outputs, prefix)
    return [grid[24:, i * grid.shape[1] // count:(i + 1) * grid.shape[1] // count] for i in range(count)]


def check_asyrp_edit(host, workflow, outputs):
    """The Asyrp Sampler's edited image differs from the unedited one sampled on the same noise; at alpha 0 the
    patched model is the model, and the two are the same image."""
    def pair(outputs):
        return [saved_by_prefix(host, workflow, outputs, f"semdir_asyrp_{name}") for name in ("edited", "unedited")]
    edited, unedited = pair(outputs)
    assert np.abs(edited - unedited).max() > 2
    for node in workflow["nodes"]:
        if node["type"] == "ApplyDirection":
            node["widgets_values"][2] = 0.0  # index, layer, alpha, ...
    edited, unedited = pair(run_everything(host, workflow))
    assert np.array_equal(edited, unedited)


def check_svd_attribute(host, workflow, outputs):
    """The fitted latent, continued with the source prompt, moves the image; fitted to the source alone (the
    target's weights 0) it moves it far less: at the workflow's k 16, m 8 and 300 iterations the fit starts at
    the target's components and does not quite reach the source latent (mean change 1.0 levels, against 2.5)."""
    def change(outputs):
        edited, original = (saved_by_prefix(host, workflow, outputs, f"semdir_svd_{name}")
                            for name in ("edited", "original"))
        return float(np.abs(edited - original).mean())
    default = change(outputs)
    for node in workflow["nodes"]:
        if node["type"] == "SVDLatentAttribute":  # k, m, target_weight, source_weight, target_values, source_values
            node["widgets_values"][2], node["widgets_values"][4], node["widgets_values"][5] = 0.0, 0.0, 0.0
    source_only = change(run_everything(host, workflow))
    assert default > 1 and source_only < default / 2, (default, source_only)


def check_named_direction(host, workflow, outputs):
    """The named direction changes the image along the sweep (alpha -1, -0.5, 0, 0.5, 1), the more the larger
    |alpha| (on the tiny random model the change is small, but beyond the 8-bit rounding of one level)."""
    tiles = grid_tiles(host, workflow, outputs)
    change = [float(np.abs(tile - tiles[2]).mean()) for tile in tiles]
    assert change[0] > change[1] > 0 and change[4] > change[3] > 0, change
    assert np.abs(tiles[0] - tiles[2]).max() > 2 and np.abs(tiles[4] - tiles[2]).max() > 2


def check_conditional_direction(host, workflow, outputs):
    """Both sweeps start from the same noise, so their alpha 0 tiles are the same image; each changes away from
    it, and the projected direction's ends differ from the plain one's."""
    plain, kept = (grid_tiles(host, workflow, outputs, prefix=prefix)
                   for prefix in ("semdir_old", "semdir_old_no_eyeglasses"))
    assert np.array_equal(plain[2], kept[2])
    for tiles in (plain, kept):
        assert np.abs(tiles[0] - tiles[2]).max() > 2 and np.abs(tiles[4] - tiles[2]).max() > 2
    assert np.abs(plain[4] - kept[4]).max() > 0 and np.abs(plain[0] - kept[0]).max() > 0


def check_directions_from_examples(host, workflow, outputs):
    """The middle tile (alpha 0) reconstructs the photo to edit; the ends of the sweep differ from it."""
    tiles = grid_tiles(host, workflow, outputs)
    reference = vae_round_trip(host, "edit_me.png")
    assert psnr(tiles[2], reference) > 30
    assert np.abs(tiles[0] - tiles[2]).max() > 5 and np.abs(tiles[4] - tiles[2]).max() > 5


def check_localized_edit(host, workflow, outputs):
    """The middle tile (alpha 0) reconstructs the photo; the ends of the sweep differ from it. (That the masked
    directions change the masked region most is tested on the node: tests/test_host_samples.py.)"""
    tiles = grid_tiles(host, workflow, outputs)
    assert psnr(tiles[2], vae_round_trip(host, "example.png")) > 30
    assert np.abs(tiles[0] - tiles[2]).max() > 5 and np.abs(tiles[4] - tiles[2]).max() > 5


def check_flux_edit_real_image(host, workflow, outputs):
    """As workflow 2's check, at alpha 4: the tiny Flux's own prediction enters the Gaussian-prior denoiser at a
    twentieth of its size (GaussianPriorDenoiser), so the workflow's alpha 0.4 moves the image by two levels."""
    for node in workflow["nodes"]:
        if node["type"] == "ApplyDirection":
            node["widgets_values"][2] = 4.0  # index, layer, alpha, ...
    outputs = run_everything(host, workflow)
    check_edit_real_image(host, workflow, outputs, "UNETLoader", "semdir_flux_", (FLUX_SUBSTITUTES["VAELoader"], 0),
                          min_change=3)  # measured 7 levels


def check_flux_discover_and_sweep(host, workflow, outputs):
    """The Flux sweep changes the image away from alpha 0, and more at the ends than halfway."""
    tiles = grid_tiles(host, workflow, outputs)
    change = [float(np.abs(tile - tiles[2]).mean()) for tile in tiles]
    assert change[0] > change[1] > 0 and change[4] > change[3] > 0, change


EXTRA_CHECKS = {"named_direction.json": check_named_direction,
                "conditional_direction.json": check_conditional_direction,
                "flux_edit_real_image.json": check_flux_edit_real_image,
                "flux_discover_and_sweep.json": check_flux_discover_and_sweep,
                "directions_from_examples.json": check_directions_from_examples,
                "localized_edit.json": check_localized_edit, "discover_and_sweep.json": check_discover_and_sweep,
                "edit_real_image.json": check_edit_real_image, "save_and_reuse.json": check_save_and_reuse,
                "sdxl_discover_and_sweep.json": check_discover_and_sweep, "asyrp_edit.json": check_asyrp_edit,
                "svd_attribute.json": check_svd_attribute}


@pytest.mark.parametrize("name", sorted(path.name for path in WORKFLOWS.glob("*.json")))
def test_every_workflow_runs_on_the_real_host(host, name):
    workflow = load(name)
    assert any(node["type"] == "MarkdownNote" for node in workflow["nodes"]), "explain the graph in a note"
    assert len(workflow["groups"]) >= 2
    outputs = run_everything(host, workflow)
    if name in EXTRA_CHECKS:
        EXTRA_CHECKS[name](host, workflow, outputs)
