"""Shared benchmark set-up: the real host in this process, with the pack and the test-only UNet builder."""
import argparse
import json
import threading
import time
from pathlib import Path

import psutil

from harness.host import shared_host

REPO = Path(__file__).resolve().parent.parent


def arguments(description: str, quick: str = ""):
    """--json and --device, and --quick where ``quick`` says what it leaves out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the figures) and nothing else")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to run on the host's GPU")
    return parser.parse_args()


def start_host(device: str):
    """The host in this process, on ``device``; the pack it loaded is importable as ``semantic_directions``."""
    return shared_host(device)


def unet_precision(device: str) -> dict:
    """build_unet's dtypes as the host runs an SD checkpoint: float16 weights computed in float16 on a GPU, float32
    on a CPU (where the host computes half-precision checkpoints in float32 anyway)."""
    import torch
    dtype = torch.float32 if device == "cpu" else torch.float16
    return {"dtype": dtype, "compute_dtype": dtype}


def timed(function, repeats: int = 3):
    """Best wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for i in range(repeats):
        start = time.perf_counter()
        result = function(i)
        best = min(best, time.perf_counter() - start)
    return best, result


def timed_in_turns(functions: dict, repeats: int = 3):
    """({name: best wall time}, {name: last result}) of ``functions`` ({name: function(i)}), called in turns for
    ``repeats`` rounds, the order reversed every other round: a ratio of two of them then compares runs made under
    the same load, where timing all of one and then all of the other lets the machine's drift into the ratio."""
    best, results = {name: float("inf") for name in functions}, {}
    for i in range(repeats):
        for name in (list(functions) if i % 2 == 0 else list(functions)[::-1]):
            start = time.perf_counter()
            results[name] = functions[name](i)
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


class PeakRss:
    """Samples this process's resident memory every millisecond; ``extra_mb`` is the peak above the start."""

    def __enter__(self):
        self.process, self.start, self.peak, self.running = psutil.Process(), 0, 0, True
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra_mb = (self.peak - self.start) / 2 ** 20


def full_eigh_gains(sites: dict, key_patches: dict, device, count: int) -> dict:
    """The naive baseline discovery is timed against: per site ({path: AttentionSite}), the whitened J formed and a
    full eigendecomposition of J^T J; the top ``count`` gains."""
    import torch

    from semantic_directions.directions import attention
    gains = {}
    for path, site in sites.items():
        weights = site.read(key_patches, device)
        with torch.no_grad():
            apply, _ = attention.shift_operator(weights, "whitened")
            jacobian = apply(torch.eye(weights.width, device=device))
            eigenvalues = torch.linalg.eigh(jacobian.T @ jacobian).eigenvalues
        gains[path] = eigenvalues.flip(0)[:count].clamp(min=0).sqrt().cpu()
    return gains


def report(figures: dict, as_json: bool):
    print(json.dumps(figures) if as_json else "\n".join(f"{k}: {v}" for k, v in figures.items()))


class UNetRows:
    """Counts the rows the UNet evaluates: a row is one model call for one image."""

    def __init__(self, patcher):
        self.unet, self.rows = patcher.model.diffusion_model, 0

    def __enter__(self):
        self.rows = 0
        self.hook = self.unet.register_forward_hook(lambda m, i, o: setattr(self, "rows", self.rows + i[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.hook.remove()
