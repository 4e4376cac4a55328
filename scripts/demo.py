"""The pack's main job, headless on the pinned ComfyUI: discover directions, render a strength sweep,
invert and edit a photo. Runs the example workflows themselves (workflows/*.json) through the
host's own executor and writes everything to one folder, named at the end.

    make demo                                  # the built-in faces world model (world/)
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
from PIL import Image, ImageDraw
from safetensors import safe_open

from harness.host import Host
from scripts.workflow_format import to_api
from world.faces import SIZE as FACES_SIZE, dataset

REPO = Path(__file__).resolve().parent.parent

FACES_MODEL = (
    "No checkpoint given, so this ran the built-in faces world model (world/faces_unet.safetensors, see "
    "world/MODEL_CARD.md): a 1.4 M-parameter UNet of SD1.5's block types (self-attention in the encoder, "
    "middle and decoder), trained on CPU for this pack on 32 x 32 cartoon faces drawn from seven known "
    "factors (smile, eye openness, face and hair hue, head size, position, background). It is "
    "unconditional, so the workflows' prompts are replaced by its empty conditioning, and its images are "
    "shown 4x larger. The photo's edit is stronger than the workflow's SD1.5 setting, which barely shows on "
    "it: direction {index}, alpha {alpha:g} from start to {end_percent:g}, inside the mask. Its edits are real "
    "but the world is small: for real photos run CKPT=/path/to/sd15-or-sdxl.safetensors make demo")
FACES_SCALE = 4
FACES_EDIT = {"index": 1, "alpha": 2.0, "end_percent": 1.0}  # the workflow's SD1.5 edit barely shows on it
PHOTO_SEED = 404  # a face none of the world's models saw


def is_sdxl(checkpoint: Path) -> bool:
    with safe_open(str(checkpoint), "pt") as weights:
        return any(key.startswith("conditioner.embedders.1.") for key in weights.keys())


def prompt_from(name: str, registry, checkpoint: Path | None) -> dict:
    """A workflow file as an API prompt, on the given checkpoint or the faces world's model."""
    prompt = to_api(json.loads((REPO / "workflows" / name).read_text(encoding="utf-8")), registry)
    if checkpoint is None:
        return on_faces_model(prompt)
    prompt[node_of(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = checkpoint.name
    return prompt


def on_faces_model(prompt: dict) -> dict:
    """The prompt on the faces world's model. Its loader gives MODEL, VAE and the empty conditioning the
    model was trained with, which replaces every text encoder's output; images are drawn at the world's
    32 pixels and scaled up 4x (nearest) wherever they are decoded; a single edit (an Apply Direction
    without an alpha list) takes FACES_EDIT's settings."""
    loader = node_of(prompt, "CheckpointLoaderSimple")
    prompt[loader] = {"class_type": "FacesWorldLoader", "inputs": {}}
    encoders = [i for i, node in prompt.items() if node["class_type"] == "CLIPTextEncode"]
    decoders = [i for i, node in prompt.items() if node["class_type"] == "VAEDecode"]
    relinked = {(loader, 2): [loader, 1], **{(i, 0): [loader, 2] for i in encoders},
                **{(i, 0): [f"{i}_shown", 0] for i in decoders}}
    for i in encoders:
        del prompt[i]
    for node in prompt.values():
        if [loader, 1] in node["inputs"].values():
            sys.exit(f"demo: {node['class_type']} takes the checkpoint's CLIP, which the faces model has not")
        node["inputs"] = {name: relinked.get(tuple(value), value) if isinstance(value, list) else value
                          for name, value in node["inputs"].items()}
        if node["class_type"] == "EmptyLatentImage":  # its size is in pixels of an 8x-downscaling VAE
            node["inputs"].update(width=8 * FACES_SIZE, height=8 * FACES_SIZE)
        if node["class_type"] == "ApplyDirection" and not node["inputs"].get("alpha_list"):
            node["inputs"].update(FACES_EDIT)
    for i in decoders:
        prompt[f"{i}_shown"] = {"class_type": "ImageScaleBy", "inputs": {
            "image": [i, 0], "upscale_method": "nearest-exact", "scale_by": FACES_SCALE}}
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def side_by_side(pictures: list, path: Path, height: int = 256):
    """Labelled images in a row at one height (nearest-neighbour, so small images stay sharp)."""
    images = [Image.open(file).convert("RGB") for file, _ in pictures]
    images = [image.resize((round(image.width * height / image.height), height), Image.NEAREST) for image in images]
    canvas = Image.new("RGB", (sum(image.width for image in images) + 8 * (len(images) - 1), height + 24), "white")
    left = 0
    for image, (_, label) in zip(images, pictures):
        canvas.paste(image, (left, 24))
        ImageDraw.Draw(canvas).text((left + 4, 6), label, fill="black")
        left += image.width + 8
    canvas.save(path)


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
    if checkpoint is None:
        photo = Image.fromarray(dataset(1, PHOTO_SEED)[0][0])
    else:
        side = 1024 if sdxl else 512
        photo = Image.open(host.root / "input" / "example.png").convert("RGB").resize((side, side), Image.LANCZOS)
    photo.save(host.base / "input" / "example.png")

    report, timings = [], {}
    sweep = prompt_from("sdxl_discover_and_sweep.json" if sdxl else "discover_and_sweep.json", registry, checkpoint)
    discover = node_of(sweep, "DiscoverAttentionEigendirections")
    loader = sweep[discover]["inputs"]["model"][0]
    discovery_only = {node_id: sweep[node_id] for node_id in (loader, discover)}
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
    side_by_side([(out / "input_photo.png", "photo"),
                  (next(out.glob("semdir_reconstruction_*.png")), "inverted, sampled back"),
                  (next(out.glob("semdir_edited_*.png")), "edited in the mask")], out / "edit_result.png")
    report.append("Semantic Directions demo")
    report.append(f"model: {checkpoint} ({'SDXL' if sdxl else 'SD1.5'})" if checkpoint
                  else FACES_MODEL.format(**FACES_EDIT))
    report.append("")
    report += [f"{seconds:8.2f} s  {name}" for name, seconds in timings.items()]
    report.append("")
    report.append("files: semdir_sweep_* (the labelled sweep grid, alphas -1 to 1), semdir_edited_* and "
                  "semdir_reconstruction_* (the photo edited, and inverted and sampled back unedited), "
                  "edit_result.png (the three side by side), ComfyUI_temp_* (previews: the gain spectrum), "
                  "directions_whitened.safetensors (the direction file), input_photo.png")
    (out / "report.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))
    print(f"\ndemo: everything is in {out}")


if __name__ == "__main__":
    main()
