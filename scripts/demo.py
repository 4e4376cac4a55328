"""The pack's main job, headless on the pinned ComfyUI: discover directions, render a strength sweep,
invert and edit a photo. Runs the example workflows themselves (workflows/*.json) through the
host's own executor, in three stages; each stage's files and its line in report.txt are written to
the run's folder as soon as the stage ends, so a stopped run keeps what it finished.

    make demo                                  # the built-in faces world model (world/)
    CKPT=/path/to/model.safetensors make demo  # a real SD1.5 or SDXL checkpoint

Settings come from the environment; each is checked before anything loads (a bad one is a one-line
error), and the report says which were used and where each came from:

    DEMO_OUT     the folder the run's folder goes in (default: out/)
    DEMO_DEVICE  cpu or cuda (default: cuda when torch sees a GPU, else cpu)
    DEMO_QUICK   1: small settings that finish on a CPU: a checkpoint at 256 px (SDXL 512), 8 steps for every
                 sampler and the inversion, a sweep of 3 (alphas -1, 0, 1); 0: the workflows' own (512 px,
                 SDXL 1024, 25 sweep steps, 50 to invert and sample back, a sweep of 5). Default: 1 for a
                 checkpoint on the CPU, else 0 (the faces world's model is small enough for the workflows' own)
    DEMO_SIZE    image side in pixels, a multiple of 64 from 64 to 2048 (checkpoints; the faces world is 32 px)
    DEMO_STEPS   steps of the sweep's sampler, the inversion and both samplings back, 1 to 1000
    DEMO_SWEEP   the sweep's alphas, comma-separated, one image each, at most 16 (e.g. -1,0,1)
    DEMO_THREADS torch's CPU threads (default on the CPU: torch's own, one a core, less the cores the load
                 average says are busy; threads beyond the idle cores slow every step down)

DEMO_SIZE, DEMO_STEPS and DEMO_SWEEP override whichever settings DEMO_QUICK chose. The console shows a line
as each stage starts and ends, the host's progress bars, and DDIM Invert's steps; Ctrl-C stops the running
node at its next step (twice: at once).
"""
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
FACES_EDIT = {"index": 1, "alpha": 1.0, "end_percent": 1.0}  # the workflow's SD1.5 edit barely shows on it
PHOTO_SEED = 404  # a face none of the world's models saw

DEVICES = ("cpu", "cuda")
WORKFLOW_SIZE = {"SD1.5": 512, "SDXL": 1024}  # what the workflows render; the photo is made this size too
QUICK_SIZE = {"SD1.5": 256, "SDXL": 512}
QUICK_STEPS = 8
QUICK_SWEEP = (-1.0, 0.0, 1.0)
SIZE_RANGE, STEPS_RANGE, THREADS_RANGE, MAX_SWEEP = (64, 2048), (1, 1000), (1, 1024), 16
# Samplers whose progress the host prints itself (a console bar); every other node's progress (DDIM Invert's)
# reaches only the host's progress hook, which the demo prints.
CONSOLE_BARS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}


class SettingError(SystemExit):
    """A bad setting: the process exits with this one line."""


@dataclass
class Settings:
    """What the run changes in the workflows (None keeps the workflow's own value), and why."""
    device: str
    quick: bool
    size: int | None = None
    steps: int | None = None
    sweep: tuple | None = None
    threads: int | None = None  # torch's CPU threads; None leaves torch's own number (on a GPU)
    why: dict = field(default_factory=dict)  # setting -> where its value came from


def settings_from(environ, family: str | None, gpu: bool, threads: tuple = (None, "torch's default")) -> Settings:
    """The run's settings from DEMO_* variables (empty counts as unset), for a checkpoint of ``family``
    ('SD1.5' or 'SDXL') or the faces world's model (None), on a machine with or without a GPU; ``threads``
    is the CPU thread count to use unless DEMO_THREADS says, and why (see harness.cpu.idle_threads)."""
    def given(name):
        return environ.get(name, "").strip()

    device = given("DEMO_DEVICE").lower()
    if device and device not in DEVICES:
        raise SettingError(f"DEMO_DEVICE: expected cpu or cuda, got {given('DEMO_DEVICE')!r}")
    if device == "cuda" and not gpu:
        raise SettingError("DEMO_DEVICE: cuda asked for, but torch sees no GPU here; use cpu or leave it unset")
    why = {"device": "DEMO_DEVICE" if device else ("torch sees a GPU" if gpu else "torch sees no GPU")}
    device = device or ("cuda" if gpu else "cpu")

    quick = given("DEMO_QUICK")
    if quick not in ("", "0", "1"):
        raise SettingError(f"DEMO_QUICK: expected 1 (small settings for a CPU) or 0 (the workflows' own), "
                           f"got {quick!r}")
    if quick:
        why["quick"] = "DEMO_QUICK"
    else:
        why["quick"] = (f"the default for a checkpoint on the {'CPU' if device == 'cpu' else 'GPU'}"
                        if family else "the default for the faces world's small model")
    settings = Settings(device, quick == "1" if quick else (device == "cpu" and family is not None), why=why)
    if settings.quick:
        settings.size, settings.steps, settings.sweep = QUICK_SIZE.get(family), QUICK_STEPS, QUICK_SWEEP
        why.update(size="quick", steps="quick", sweep="quick")

    if given("DEMO_SIZE"):
        if family is None:
            raise SettingError("DEMO_SIZE: the faces world's model draws 32 x 32 images only; "
                               "give CKPT to choose a size")
        settings.size = integer("DEMO_SIZE", given("DEMO_SIZE"), *SIZE_RANGE, "pixels a side")
        if settings.size % 64:
            raise SettingError(f"DEMO_SIZE: expected a multiple of 64 (the latent must halve three times), "
                               f"got {settings.size}")
        why["size"] = "DEMO_SIZE"
    if given("DEMO_STEPS"):
        settings.steps = integer("DEMO_STEPS", given("DEMO_STEPS"), *STEPS_RANGE, "steps")
        why["steps"] = "DEMO_STEPS"
    if given("DEMO_SWEEP"):
        settings.sweep = alphas("DEMO_SWEEP", given("DEMO_SWEEP"))
        why["sweep"] = "DEMO_SWEEP"
    if given("DEMO_THREADS"):
        settings.threads = integer("DEMO_THREADS", given("DEMO_THREADS"), *THREADS_RANGE, "CPU threads")
        why["threads"] = "DEMO_THREADS"
    elif device == "cpu":
        settings.threads, why["threads"] = threads
    return settings


def integer(name: str, text: str, low: int, high: int, unit: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SettingError(f"{name}: expected a whole number of {unit} from {low} to {high}, got {text!r}") from None
    if not low <= value <= high:
        raise SettingError(f"{name}: expected {low} to {high} {unit}, got {value}")
    return value


def alphas(name: str, text: str) -> tuple:
    values = []
    for part in text.replace(";", ",").split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise SettingError(f"{name}: {part.strip()!r} is not a number; expected comma-separated alphas "
                               f"like -1,0,1") from None
        if not math.isfinite(values[-1]) or abs(values[-1]) > 100:
            raise SettingError(f"{name}: {part.strip()} is not a finite alpha from -100 to 100")
    if len(values) > MAX_SWEEP:
        raise SettingError(f"{name}: {len(values)} alphas; at most {MAX_SWEEP} (one image each)")
    return tuple(values)


def alpha_text(values) -> str:
    return ", ".join(f"{value:g}" for value in values)


def checkpoint_from(environ) -> tuple:
    """CKPT as (path, family), or (None, None) for the faces world's model."""
    if not environ.get("CKPT", "").strip():
        return None, None
    checkpoint = Path(environ["CKPT"].strip()).expanduser().resolve()
    if not checkpoint.is_file():
        raise SettingError(f"CKPT: {checkpoint} is not a file; give the path of an SD1.5 or SDXL "
                           ".safetensors checkpoint")
    from safetensors import safe_open
    try:
        with safe_open(str(checkpoint), "pt") as weights:
            sdxl = any(key.startswith("conditioner.embedders.1.") for key in weights.keys())
    except Exception as error:  # safetensors raises its own error types for a foreign or damaged file
        raise SettingError(f"CKPT: {checkpoint} is not a readable .safetensors file ({error})") from None
    return checkpoint, "SDXL" if sdxl else "SD1.5"


def prompt_from(name: str, registry, checkpoint: Path | None) -> dict:
    """A workflow file as an API prompt, on the given checkpoint or the faces world's model."""
    from scripts.workflow_format import to_api
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
    from world.faces import SIZE as FACES_SIZE
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


def with_settings(prompt: dict, settings: Settings) -> dict:
    """The prompt with the run's size, steps and sweep wherever the workflow sets them: every empty latent's
    side, every sampler's and the inversion's steps (sampling back uses the inversion's), and the sweep's alpha
    list, its labels and its batch size together."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "EmptyLatentImage":
            if settings.size:
                inputs.update(width=settings.size, height=settings.size)
            if settings.sweep:
                inputs["batch_size"] = len(settings.sweep)
        if kind in ("KSampler", "KSamplerAdvanced", "DDIMInvert") and settings.steps:
            inputs["steps"] = settings.steps
        if settings.sweep and (kind == "ApplyDirection" and inputs.get("alpha_list") or kind == "LabelledImageGrid"):
            inputs["alpha_list" if kind == "ApplyDirection" else "labels"] = alpha_text(settings.sweep)
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def settings_report(settings: Settings, sweep: dict, edit: dict, family: str | None) -> list:
    """The report's lines on device and settings, read from the prompts that run."""
    why, WORKFLOWS, WORKFLOW = settings.why, "the workflows'", "the workflow's"

    def source(name, own):
        return f"({why[name]})" if name in why else f"({own})"

    latent = sweep[node_of(sweep, "EmptyLatentImage")]["inputs"]
    sweep_steps = sweep[node_of(sweep, "KSampler")]["inputs"]["steps"]
    invert_steps = edit[node_of(edit, "DDIMInvert")]["inputs"]["steps"]
    alphas_run = sweep[node_of(sweep, "ApplyDirection")]["inputs"]["alpha_list"]
    mode, other = (("quick", "DEMO_QUICK=0 runs the workflows' own") if settings.quick
                   else ("the workflows' own", "DEMO_QUICK=1 runs small ones"))
    plural = "s" if settings.threads > 1 else ""
    threads = f", {settings.threads} thread{plural} ({why['threads']})" if settings.threads else ""
    lines = [f"device: {settings.device} ({why['device']}){threads}",
             f"settings: {mode}, {why['quick']} ({other}; "
             f"DEMO_SIZE, DEMO_STEPS and DEMO_SWEEP override them)"]
    if family is None:
        lines.append("  size   32 x 32 px (the faces world's), shown 4x")
    else:
        lines.append(f"  size   {latent['width']} x {latent['height']} px {source('size', WORKFLOWS)}")
    if sweep_steps == invert_steps:
        steps = f"{sweep_steps} for the sweep, the inversion and both samplings back"
    else:
        steps = f"{sweep_steps} for the sweep, {invert_steps} for the inversion and both samplings back"
    lines.append(f"  steps  {steps} {source('steps', WORKFLOWS)}")
    lines.append(f"  sweep  alphas {alphas_run}: {latent['batch_size']} images in one sampler call "
                 f"{source('sweep', WORKFLOW)}")
    return lines


def side_by_side(pictures: list, path: Path, height: int = 256):
    """Labelled images in a row at one height (nearest-neighbour, so small images stay sharp)."""
    from PIL import Image, ImageDraw
    images = [Image.open(file).convert("RGB") for file, _ in pictures]
    images = [image.resize((round(image.width * height / image.height), height), Image.NEAREST) for image in images]
    canvas = Image.new("RGB", (sum(image.width for image in images) + 8 * (len(images) - 1), height + 24), "white")
    left = 0
    for image, (_, label) in zip(images, pictures):
        canvas.paste(image, (left, 24))
        ImageDraw.Draw(canvas).text((left + 4, 6), label, fill="black")
        left += image.width + 8
    canvas.save(path)


class Run:
    """The run's folder and report: each stage's files are copied there and its line appended as it ends;
    the console gets a line as each stage starts and ends, and DDIM Invert's progress. Ctrl-C stops the
    running node at its next step through the host's own interrupt (the UI's Cancel); a second one at once."""

    def __init__(self, host, out: Path, header: list):
        self.host, self.out, self.begun = host, out, time.perf_counter()
        self.report, self.copied, self.prompt, self.last_progress = out / "report.txt", set(), {}, 0.0
        self.stopping = False
        self.write(header)
        import comfy.utils
        comfy.utils.set_progress_bar_global_hook(self.progress)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup)
            signal.signal(signal.SIGINT, self.interrupt)

    def interrupt(self, signum, frame):
        if self.stopping:
            raise KeyboardInterrupt
        self.stopping = True
        self.say("stopping at the next step (Ctrl-C again stops at once) ...")
        import comfy.model_management
        comfy.model_management.interrupt_current_processing(True)

    def write(self, lines: list):
        with self.report.open("a", encoding="utf-8") as report:
            report.write("".join(line + "\n" for line in lines))

    def say(self, text: str):
        print(f"demo [{time.perf_counter() - self.begun:7.1f} s] {text}", flush=True)

    def stage(self, number: int, name: str, prompt: dict, keep=lambda: []) -> list:
        """Run one prompt; copy the images it saved or previewed and ``keep()``'s files; report it."""
        if self.stopping:  # Ctrl-C between stages, which the host's next prompt would forget
            self.write(["", f"stopped before stage {number}; the files above are complete"])
            raise KeyboardInterrupt
        self.say(f"stage {number}/3: {name} ...")
        self.prompt, start = prompt, time.perf_counter()
        try:
            self.host.run(prompt)
        except BaseException as error:
            seconds = time.perf_counter() - start
            stopped = self.stopping or isinstance(error, KeyboardInterrupt)
            reason = "stopped" if stopped else f"failed: {error}"
            self.write([f"{seconds:8.2f} s  {name}: {reason}", "", "the run ended here; the files above are complete"])
            self.say(f"stage {number}/3 {reason} after {seconds:.1f} s; what finished is in {self.out}")
            if stopped:
                raise KeyboardInterrupt from None
            raise
        seconds = time.perf_counter() - start
        files = []
        for folder in ("output", "temp"):
            for path in sorted((self.host.base / folder).rglob("*.png")):
                if path not in self.copied:
                    self.copied.add(path)
                    shutil.copy(path, self.out / path.name)
                    files.append(path.name)
        files += keep()
        self.write([f"{seconds:8.2f} s  {name}", f"            wrote {', '.join(files)}"])
        self.say(f"stage {number}/3 done in {seconds:.1f} s: {', '.join(files)}")
        return files

    def progress(self, value, total, preview=None, **_):
        """The host's progress hook: prints the progress of nodes that have no console bar of their own."""
        if self.stopping:  # again: the host clears the flag when a prompt starts, which a Ctrl-C may precede
            import comfy.model_management
            comfy.model_management.interrupt_current_processing(True)
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        node = self.prompt.get(context.node_id, {}) if context else {}
        kind = node.get("class_type")
        if kind is None or kind in CONSOLE_BARS:
            return
        now = time.perf_counter()
        if value >= total or now - self.last_progress >= 2:
            self.last_progress = now
            self.say(f"  {kind} step {value}/{total}")


def main():
    environ = os.environ
    checkpoint, family = checkpoint_from(environ)
    import torch

    from harness.cpu import idle_threads
    gpu = torch.cuda.is_available()
    settings = settings_from(environ, family, gpu, idle_threads())
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out_parent = Path(environ.get("DEMO_OUT", "").strip() or REPO / "out")
    out = out_parent / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True)
    except OSError as error:
        raise SettingError(f"DEMO_OUT: cannot make the run's folder {out} ({error.strerror})") from None
    print(f"demo: writing to {out} (report.txt grows as each stage ends)", flush=True)

    from PIL import Image

    from harness.host import Host
    from world.faces import dataset
    host = Host(Path(tempfile.mkdtemp(prefix="semdir-demo-")), device=settings.device)
    registry = host.nodes.NODE_CLASS_MAPPINGS
    if checkpoint is not None:
        host.folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent))
        side = settings.size or WORKFLOW_SIZE[family]
        photo = Image.open(host.root / "input" / "example.png").convert("RGB").resize((side, side), Image.LANCZOS)
    else:
        photo = Image.fromarray(dataset(1, PHOTO_SEED)[0][0])
    photo.save(host.base / "input" / "example.png")
    photo.save(out / "input_photo.png")

    sweep = with_settings(prompt_from("sdxl_discover_and_sweep.json" if family == "SDXL" else "discover_and_sweep.json",
                                      registry, checkpoint), settings)
    edit = with_settings(prompt_from("edit_real_image.json", registry, checkpoint), settings)
    discover = node_of(sweep, "DiscoverAttentionEigendirections")
    loader = sweep[discover]["inputs"]["model"][0]
    discovery_only = {node_id: sweep[node_id] for node_id in (loader, discover)}
    discovery_only["save"] = {"class_type": "SaveDirections", "inputs": {
        "directions": [discover, 0], "filename": "demo/whitened", "overwrite": True}}

    header = ["Semantic Directions demo",
              f"model: {checkpoint} ({family})" if checkpoint else FACES_MODEL.format(**FACES_EDIT),
              *settings_report(settings, sweep, edit, family), "",
              "files: input_photo.png (the photo), directions_whitened.safetensors (the direction file), "
              "semdir_sweep_* (the labelled sweep grid), ComfyUI_temp_* (previews: the gain spectrum), "
              "semdir_edited_* and semdir_reconstruction_* (the photo edited, and inverted and sampled back "
              "unedited), edit_result.png (the three side by side)",
              "", "stages, each written as it ended:"]
    run = Run(host, out, header)
    print("\n".join(header), flush=True)

    def direction_file():
        shutil.copy(host.models_dir("directions") / "demo" / "whitened.safetensors",
                    out / "directions_whitened.safetensors")
        return ["directions_whitened.safetensors"]

    def edit_result():
        side_by_side([(out / "input_photo.png", "photo"),
                      (next(out.glob("semdir_reconstruction_*.png")), "inverted, sampled back"),
                      (next(out.glob("semdir_edited_*.png")), "edited in the mask")], out / "edit_result.png")
        return ["edit_result.png"]

    images = sweep[node_of(sweep, "EmptyLatentImage")]["inputs"]["batch_size"]
    started = time.perf_counter()
    try:
        run.stage(1, "load the model, discover and save directions", discovery_only, direction_file)
        run.stage(2, f"render the strength sweep ({images} images, one sampler call)", sweep)
        run.stage(3, "invert the photo, edit inside a mask, sample back", edit, edit_result)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        sys.exit(f"demo: {error}")
    run.write(["", f"{time.perf_counter() - started:8.2f} s  in all"])
    print(f"\ndemo: everything is in {out}")


if __name__ == "__main__":
    main()
