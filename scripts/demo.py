"""The pack's main job, headless on the pinned ComfyUI: discover directions, render a strength sweep,
invert and edit a photo. Runs the example workflows themselves (workflows/*.json) through the
host's own executor and writes everything to one folder, named at the end.

    make demo                                  # the built-in tiny model
    CKPT=/path/to/model.safetensors make demo  # a real SD1.5 or SDXL checkpoint

DEMO_OUT=/folder puts the run's folder there instead of out/.
"""
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from host import Host  # noqa: E402
from workflow_format import to_api  # noqa: E402

TINY_MODEL = (
    "No checkpoint given, so this ran the built-in tiny model: an SD1.5-shaped UNet of width 32 with seeded "
    "random weights, made a denoiser of Gaussian data; SD1.5's tokenizer with a 3-layer text encoder of width "
    "32; a TAESD-shaped VAE; all untrained. It shows the whole pipeline working (directions found in well under "
    "a second, sweeps rendered in one call, inversion reconstructing the photo) but its images are not pictures "
    "and its edits carry no meaning. For real edits run: CKPT=/path/to/sd15-or-sdxl.safetensors make demo")
TINY_SIZE = 128


def is_sdxl(checkpoint: Path) -> bool:
    with safe_open(str(checkpoint), "pt") as weights:
        return any(key.startswith("conditioner.embedders.1.") for key in weights.keys())


def prompt_from(name: str, registry, checkpoint: Path | None) -> dict:
    """A workflow file as an API prompt, on the given checkpoint or the tiny model at a tiny size."""
    prompt = to_api(json.loads((REPO / "workflows" / name).read_text(encoding="utf-8")), registry)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            if checkpoint is None:
                node["class_type"], node["inputs"] = "TinyCheckpointLoader", {"seed": 0}
            else:
                node["inputs"]["ckpt_name"] = checkpoint.name
        if node["class_type"] == "EmptyLatentImage" and checkpoint is None:
            node["inputs"].update(width=TINY_SIZE, height=TINY_SIZE)
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def main():
    checkpoint = Path(os.environ["CKPT"]).resolve() if os.environ.get("CKPT") else None
    if checkpoint is not None and not checkpoint.is_file():
        sys.exit(f"CKPT: {checkpoint} is not a file; give the path of an SD1.5 or SDXL .safetensors checkpoint")
    sdxl = checkpoint is not None and is_sdxl(checkpoint)
    host = Host(Path(tempfile.mkdtemp(prefix="semdir-demo-")), device="cuda" if torch.cuda.is_available() else "cpu")
    registry = host.nodes.NODE_CLASS_MAPPINGS
    if checkpoint is not None:
        host.folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent))
    out = Path(os.environ.get("DEMO_OUT", REPO / "out")) / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    photo = Image.open(host.root / "input" / "example.png").convert("RGB")
    side = TINY_SIZE if checkpoint is None else (1024 if sdxl else 512)
    photo.resize((side, side), Image.LANCZOS).save(host.base / "input" / "example.png")

    report, timings = [], {}
    sweep = prompt_from("sdxl_discover_and_sweep.json" if sdxl else "discover_and_sweep.json", registry, checkpoint)
    discover = node_of(sweep, "DiscoverAttentionEigendirections")
    discovery_only = {node_id: node for node_id, node in sweep.items()
                      if node_id == discover or node["class_type"] in ("CheckpointLoaderSimple", "TinyCheckpointLoader")}
    discovery_only["save"] = {"class_type": "SaveDirections", "inputs": {
        "directions": [discover, 0], "filename": "demo/whitened", "overwrite": True}}
    for name, prompt in (("load the model, discover and save directions", discovery_only),
                         ("render the strength sweep (5 images, one sampler call)", sweep),
                         ("invert the photo, edit inside a mask, sample back", prompt_from(
                             "edit_real_image.json", registry, checkpoint))):
        print(f"demo: {name} ...", flush=True)
        start = time.perf_counter()
        host.run(prompt)
        timings[name] = time.perf_counter() - start

    for folder in ("output", "temp"):
        for path in sorted((host.base / folder).rglob("*.png")):
            shutil.copy(path, out / path.name)
    shutil.copy(host.models_dir("directions") / "demo" / "whitened.safetensors", out / "directions_whitened.safetensors")
    shutil.copy(host.base / "input" / "example.png", out / "input_photo.png")
    report.append("Semantic Directions demo")
    report.append(f"model: {checkpoint} ({'SDXL' if sdxl else 'SD1.5'})" if checkpoint else TINY_MODEL)
    report.append("")
    report += [f"{seconds:8.2f} s  {name}" for name, seconds in timings.items()]
    report.append("")
    report.append("files: semdir_sweep_* (the labelled sweep grid, alphas -1 to 1), semdir_edited_* and "
                  "semdir_reconstruction_* (the photo edited, and inverted and sampled back unedited), "
                  "ComfyUI_temp_* (previews: the gain spectrum), directions_whitened.safetensors (the direction "
                  "file), input_photo.png")
    (out / "report.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))
    print(f"\ndemo: everything is in {out}")


if __name__ == "__main__":
    main()
