"""The README's demo command: on the built-in faces world model, and on a checkpoint file (CKPT) that the
host's own save path writes and its CheckpointLoaderSimple detects as SD1.5; its settings for the CPU and the
GPU, and one-line errors for bad ones."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from safetensors import safe_open

from harness.host import REPO
from scripts.demo import QUICK_SIZE, QUICK_STEPS, QUICK_SWEEP, SettingError, settings_from

pytestmark = pytest.mark.server


def demo_environment(tmp_path, **environ) -> dict:
    """DEMO_OUT in tmp_path and the DEMO_* variables given (others unset); no CKPT unless given."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("DEMO_")}
    return {**clean, "DEMO_OUT": str(tmp_path), "CKPT": "", **environ}


def run_demo(tmp_path, **environ):
    return subprocess.run([sys.executable, "-m", "scripts.demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=demo_environment(tmp_path, **environ))


def test_demo_writes_its_folder(tmp_path):
    result = run_demo(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = re.search(r"demo: everything is in (\S+)", result.stdout).group(1)
    files = {path.name for path in tmp_path.glob("demo-*/*")}
    assert str(tmp_path) in folder and {"report.txt", "directions_whitened.safetensors", "input_photo.png"} <= files
    assert all(any(name.startswith(prefix) for name in files)
               for prefix in ("semdir_sweep", "semdir_edited", "semdir_reconstruction"))
    report = next(tmp_path.glob("demo-*/report.txt")).read_text()
    assert "faces world model" in report and re.search(r"\d+\.\d+ s  render the strength sweep", report)
    assert "settings: the workflows' own" in report  # the faces world's model is small enough for them
    edited = Image.open(next(tmp_path.glob("demo-*/semdir_edited_*.png")))
    assert edited.size == (128, 128)  # the world's 32 pixels, shown 4x
    with safe_open(str(next(tmp_path.glob("demo-*/directions_whitened.safetensors"))), "pt") as directions:
        assert directions.metadata()["semantic_directions"]


@pytest.fixture(scope="session")
def sd15_checkpoint(host, tmp_path_factory):
    """A small SD1.5 checkpoint file (UNet of SD1.5's widths at reduced depth, full CLIP-L, TAESD-shaped VAE)
    written once per session by the host's comfy.sd.save_checkpoint; its own loader must see SD1.5."""
    import comfy.sd
    import comfy.supported_models

    from harness.test_nodes.unets import write_sd15_checkpoint
    path = write_sd15_checkpoint(tmp_path_factory.mktemp("checkpoints") / "small_sd15.safetensors")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    assert type(model.model.model_config) is comfy.supported_models.SD15 and clip is not None and vae is not None
    return path


def test_demo_runs_a_checkpoint_with_cpu_settings(sd15_checkpoint, tmp_path):
    """CKPT on the CPU: quick settings by default (here at 64 px, so the test stays short)."""
    result = run_demo(tmp_path, CKPT=str(sd15_checkpoint), DEMO_DEVICE="cpu", DEMO_SIZE="64")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in (1, 2, 3):  # a line as each stage starts and ends, with the time since the start
        assert re.search(rf"demo \[ *\d+\.\d s\] stage {stage}/3: .* \.\.\.", result.stdout)
        assert re.search(rf"demo \[ *\d+\.\d s\] stage {stage}/3 done in \d+\.\d s", result.stdout)
    # the inversion's progress, which has no console bar
    assert re.search(rf"DDIMInvert step {QUICK_STEPS}/{QUICK_STEPS}", result.stdout)
    report = next(tmp_path.glob("demo-*/report.txt")).read_text()
    assert f"model: {sd15_checkpoint} (SD1.5)" in report
    assert re.search(r"device: cpu \(DEMO_DEVICE\), \d+ threads? \(torch's default", report)
    assert "settings: quick, the default for a checkpoint on the CPU" in report
    assert "size   64 x 64 px (DEMO_SIZE)" in report
    assert f"steps  {QUICK_STEPS} for the sweep, the inversion and both samplings back (quick)" in report
    assert "sweep  alphas -1, 0, 1: 3 images in one sampler call (quick)" in report
    assert all(re.search(rf"\d+\.\d+ s  {stage}", report) for stage in ("load the model", "render the strength sweep",
                                                                          "invert the photo"))
    folder = next(tmp_path.glob("demo-*"))
    written = {p.name for p in folder.iterdir()}
    assert {"directions_whitened.safetensors", "input_photo.png", "edit_result.png"} <= written
    assert Image.open(next(folder.glob("semdir_sweep_*.png"))).width == 3 * 64  # three alphas side by side
    for name in ("semdir_edited_*.png", "semdir_reconstruction_*.png", "input_photo.png"):
        assert Image.open(next(folder.glob(name))).size == (64, 64)


def test_a_stopped_demo_keeps_its_finished_stages(sd15_checkpoint, tmp_path):
    """Ctrl-C in the sweep (1000 steps, which would not end in time) stops it at its next step through the
    host's own interrupt; the first stage's files and report lines were written when it ended."""
    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "scripts.demo"], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env=demo_environment(tmp_path / "out", CKPT=str(sd15_checkpoint), DEMO_DEVICE="cpu", DEMO_SIZE="64",
                                 DEMO_STEPS="1000"),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
        try:
            for line in process.stdout:
                if "stage 2/3:" in line:
                    break
            time.sleep(2)
            process.send_signal(signal.SIGINT)
            stdout, _ = process.communicate(timeout=120)
        finally:
            process.kill()
    assert process.returncode == 130, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert "stage 2/3 stopped after" in stdout
    folder = next((tmp_path / "out").glob("demo-*"))
    assert {p.name for p in folder.iterdir()} == {"report.txt", "input_photo.png", "directions_whitened.safetensors"}
    report = (folder / "report.txt").read_text()
    assert re.search(r"\d+\.\d+ s  load the model, discover and save directions\n +wrote directions_whitened", report)
    assert re.search(r"\d+\.\d+ s  render the strength sweep \(3 images, one sampler call\): stopped", report)


def test_settings_follow_the_device():
    """Quick settings for a checkpoint on the CPU, the workflows' own on a GPU and for the faces world;
    DEMO_QUICK chooses either, and DEMO_SIZE, DEMO_STEPS and DEMO_SWEEP override both."""
    cpu = settings_from({}, "SD1.5", gpu=False)
    assert (cpu.device, cpu.quick, cpu.size, cpu.steps, cpu.sweep) == ("cpu", True, QUICK_SIZE["SD1.5"], QUICK_STEPS,
                                                                      QUICK_SWEEP)
    assert settings_from({}, "SDXL", gpu=False).size == QUICK_SIZE["SDXL"]
    for settings in (settings_from({}, "SD1.5", gpu=True), settings_from({"DEMO_QUICK": "0"}, "SDXL", gpu=False),
                     settings_from({}, None, gpu=False)):
        assert not settings.quick and (settings.size, settings.steps, settings.sweep) == (None, None, None)
    gpu_asked_cpu = settings_from({"DEMO_DEVICE": "cpu"}, "SD1.5", gpu=True)
    assert gpu_asked_cpu.device == "cpu" and gpu_asked_cpu.quick
    quick_gpu = settings_from({"DEMO_QUICK": "1", "DEMO_SIZE": "384", "DEMO_STEPS": "12", "DEMO_SWEEP": "-2; 2"},
                              "SD1.5", gpu=True)
    assert (quick_gpu.device, quick_gpu.quick, quick_gpu.size, quick_gpu.steps, quick_gpu.sweep) == \
        ("cuda", True, 384, 12, (-2.0, 2.0))
    assert quick_gpu.why["size"] == "DEMO_SIZE" and settings_from({}, "SD1.5", gpu=False).why["size"] == "quick"
    assert quick_gpu.threads is None  # torch's own on a GPU
    assert settings_from({}, None, gpu=False, threads=(1, "load 5 on 2")).threads == 1
    assert settings_from({"DEMO_THREADS": "3"}, None, gpu=True).threads == 3


def test_torch_threads_follow_the_idle_cores(monkeypatch):
    """harness.cpu.idle_threads (the demo's and the semantics benchmark's CPU threads): torch's default less the
    cores the 1-minute load average keeps busy, at least one; the default where no load average exists."""
    import torch

    from harness.cpu import idle_threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, threads in ((0.2, 2), (0.7, 1), (5.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert idle_threads() == (threads, f"torch's default 2, fitted to the idle cores: load {load:.1f} on 2")

    def no_load_average():
        raise OSError("no load average")
    monkeypatch.setattr(os, "getloadavg", no_load_average)
    assert idle_threads() == (2, "torch's default")


@pytest.mark.parametrize("environ, family, message", [
    ({"DEMO_DEVICE": "tpu"}, "SD1.5", "DEMO_DEVICE: expected cpu or cuda"),
    ({"DEMO_DEVICE": "cuda"}, "SD1.5", "DEMO_DEVICE: cuda asked for, but torch sees no GPU"),
    ({"DEMO_QUICK": "yes"}, "SD1.5", "DEMO_QUICK: expected 1"),
    ({"DEMO_SIZE": "100"}, "SD1.5", "DEMO_SIZE: expected a multiple of 64"),
    ({"DEMO_SIZE": "4096"}, "SD1.5", "DEMO_SIZE: expected 64 to 2048"),
    ({"DEMO_SIZE": "big"}, "SD1.5", "DEMO_SIZE: expected a whole number"),
    ({"DEMO_SIZE": "256"}, None, "DEMO_SIZE: the faces world's model draws 32 x 32 images only"),
    ({"DEMO_STEPS": "0"}, "SD1.5", "DEMO_STEPS: expected 1 to 1000"),
    ({"DEMO_THREADS": "0"}, "SD1.5", "DEMO_THREADS: expected 1 to 1024 CPU threads"),
    ({"DEMO_SWEEP": "-1, nan"}, "SD1.5", "DEMO_SWEEP: nan is not a finite alpha"),
    ({"DEMO_SWEEP": "-1, x"}, "SD1.5", "DEMO_SWEEP: 'x' is not a number"),
    ({"DEMO_SWEEP": ",".join(["1"] * 17)}, "SD1.5", "DEMO_SWEEP: 17 alphas; at most 16"),
])
def test_bad_settings_are_one_line_errors(environ, family, message):
    with pytest.raises(SettingError) as error:
        settings_from(environ, family, gpu=False)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_setting_stops_before_anything_loads(tmp_path):
    result = run_demo(tmp_path, DEMO_STEPS="many")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "DEMO_STEPS: expected a whole number of steps from 1 to 1000, got 'many'"]
    assert not list(tmp_path.iterdir())  # no run folder
    missing = run_demo(tmp_path, CKPT=str(tmp_path / "nowhere.safetensors"))
    assert missing.returncode == 1 and missing.stderr.strip().startswith("CKPT: ") and not list(tmp_path.iterdir())
