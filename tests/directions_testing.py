"""Helpers for the tests: sample direction sets, float32 comparisons, the Jacobian node's products, saved images."""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness.comfyui import REPO
from semantic_directions.directions.attention import AttentionWeights
from semantic_directions.directions.directionset import DirectionSet, SiteDirections, model_fingerprint

SITE_A = "input_blocks.7.1.transformer_blocks.0.attn1"
SITE_B = "middle_block.1.transformer_blocks.0.attn1"


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def random_layer(width, heads, seed=0, dtype=torch.float64):
    """An attention layer's weights, Gaussian with variance 1 / width (what a trained layer's init draws)."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda rows, cols: torch.randn(rows, cols, generator=generator, dtype=dtype) / cols ** 0.5  # noqa: E731
    return AttentionWeights(make(width, width), make(width, width), make(width, width), make(width, width), heads)


def planted(rows: int, columns: int, singular_values: torch.Tensor, seed: int = 0):
    """(A = U diag(s) V^T [rows, columns] in float64 with random orthonormal U, V, and V^T's rows)."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(columns, columns, generator=generator, dtype=torch.float64)).Q
    return left @ torch.diag(singular_values.double()) @ right.T, right.T


def orthonormal(count: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, count, generator=generator, dtype=torch.float64))
    return q.T.contiguous().float()


def sample_set(gains: bool = True) -> DirectionSet:
    sites = {
        SITE_A: SiteDirections(orthonormal(4, 64, 1), torch.tensor([4.0, 3.0, 2.0, 1.0]) if gains else None),
        SITE_B: SiteDirections(orthonormal(3, 128, 2), torch.tensor([9.0, 5.0, 0.5]) if gains else None),
        "h_space": SiteDirections(orthonormal(2, 128, 3)),
    }
    widths = {SITE_A: 64, SITE_B: 128, "h_space": 128}
    return DirectionSet(sites=sites, method="test", params={"count": 4, "note": "ünïcode"},
                        model={"family": "SD15", "fingerprint": model_fingerprint("SD15", widths)})


FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 64, scale=None) -> None:
    """Equal up to float32 rounding: every difference within ``ulps`` float32 epsilons of the largest
    magnitude involved (``scale``, default the larger of the two tensors' largest entries). Sums and
    products of a few dozen float32 terms of magnitude M round to errors of order M * eps, anywhere in
    the tensor, so a tolerance relative to each element (rtol) or absolute (atol) misjudges them."""
    if scale is None:
        scale = max(actual.detach().abs().max().item(), expected.detach().abs().max().item())
    worst = (actual.double() - expected.double()).abs().max().item()
    assert worst <= ulps * FLOAT32_EPS * scale, f"differ by {worst:.3g}, more than {ulps} float32 ulps of {scale:.3g}"


def jacobian_solved(model, positive, negative, samples, site: str, cfg: float, solve, rows: int):
    """``solve(apply, apply_t, width)``'s result on the Jacobian Directions From Image differentiates at ``site``:
    the model's prediction for ``samples`` noised with seed 3 to 0.3 of the schedule (``rows``: the bar's
    estimate)."""
    from semantic_directions.nodes.host import model_sampling
    from semantic_directions.nodes.jacobian import RowProgress, site_widths, with_jacobian
    sigmas = torch.tensor([float(model_sampling(model).percent_to_sigma(0.3)), 0.0])
    return with_jacobian(model, positive, negative, samples, 3, sigmas, cfg, site, site_widths(model, [site])[site],
                         solve, RowProgress(rows)).found


@torch.library.custom_op("semantic_directions_test::fused_copy", mutates_args=())
def fused_copy(x: torch.Tensor) -> torch.Tensor:
    """A fused kernel as newer hosts register theirs (comfy_kitchen's): a custom op without derivative rules,
    forward or reverse (reverse mode fails through it; forward mode passes it with the tangent dropped, silently)."""
    return x.clone()


def assert_reverse_products_transpose_forward_ones(model, positive, negative, samples, site: str, cfg: float = 1.0):
    """Directions From Image's products with the Jacobian at ``site``: U^T (J V) from forward mode equals
    (J^T U)^T V from reverse mode, for random V and U, on the host's own model inside its guider (the
    reverse pass through weights the host may have loaded in inference mode)."""
    generator = torch.Generator().manual_seed(5)

    def solve(apply, apply_t, width):
        vectors = torch.randn(width, 3, generator=generator)
        forward = apply(vectors)
        outputs = torch.randn(forward.shape[0], 5, generator=generator)
        return outputs.T @ forward, apply_t(outputs).T @ vectors
    forward, reverse = jacobian_solved(model, positive, negative, samples, site, cfg, solve, 8)
    assert forward.abs().max() > 0
    # sums of a few thousand float32 products either way: agreement to float32 rounding of their size
    assert_float32_close(reverse, forward, ulps=2 ** 10)


def assert_pair_is_mean_difference(found: SiteDirections, source, target) -> None:
    """A pair node's direction at a site against the site's tokens recorded independently: ``source`` and
    ``target`` are (per call and image: the tokens' mean over positions [calls, images, width], their RMS token
    norm [calls, images]). The direction is the normalised difference of the two means, its gain that
    difference's size in the mean RMS norm of the two recordings (docs/math.md, 'Pair directions')."""
    (source, source_norms), (target, target_norms) = source, target
    difference = target.mean((0, 1)) - source.mean((0, 1))
    scale = (source_norms.mean() + target_norms.mean()) / 2
    # float32 activations averaged in float64 on both sides: agreement to float32 rounding
    assert torch.allclose(found.vectors[0].double(), torch.nn.functional.normalize(difference, dim=0), atol=1e-5)
    assert float(found.gains[0]) == pytest.approx(float(difference.norm() / scale), rel=1e-5)


def saved_images(host, outputs: dict, node_id: str) -> list:
    """The images a SaveImage (or PreviewImage) node of a run wrote, each float32 [H, W, 3] in 0-255."""
    return [np.asarray(Image.open(host.base / ("output" if entry["type"] == "output" else "temp") / entry["subfolder"]
                                  / entry["filename"]), dtype=np.float32) for entry in outputs[node_id]["images"]]


def saved_image(host, outputs: dict, node_id: str) -> np.ndarray:
    """The first image a SaveImage (or PreviewImage) node of a run wrote."""
    return saved_images(host, outputs, node_id)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of 8-bit images."""
    return float(10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)))


def conditioning(seed: int, tokens: int = 77, width: int = 32) -> list:
    """The TinyConditioning test node's seeded text tokens for the tiny models, as CONDITIONING."""
    from harness.test_nodes import TinyConditioning
    return TinyConditioning().encode(seed, width, tokens)[0]


@contextlib.contextmanager
def progress_updates():
    """The host's progress bar's (value, total) updates while inside; its hook and interrupt flag reset after."""
    import comfy.model_management
    import comfy.utils
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: updates.append((value, total)))
    try:
        yield updates
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


def assert_cancel_stops(run) -> None:
    """With the host's interrupt flag set (the user's Cancel), ``run()`` stops with the host's exception."""
    import comfy.model_management
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run()


def denoised_once(model, noise, latent, sigma: float, positive, negative, seed: int, cfg: float = 1.0) -> torch.Tensor:
    """The model's denoised prediction of ``latent`` noised with ``noise`` to ``sigma``: one model call through the
    host's own guider and SamplerCustom path, as the nodes reach the model."""
    import comfy.sample
    import comfy.samplers

    def predict(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
        return model_fn(x, sigmas[0] * x.new_ones(x.shape[0]), **(extra_args or {}))
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(predict), torch.tensor([sigma, 0.0]),
                                      positive, negative, latent, seed=seed)


def write_test_photo(host, name: str = "example.png", size: int = 64, frequency: float | None = None) -> None:
    """A smooth test photo in the host's input folder: colour ramps and a sine stripe; each name gets its own
    stripe frequency unless given (example.png 12)."""
    if frequency is None:
        frequency = 12 + sum(name.encode()) % 7 if name != "example.png" else 12
    pixels = np.linspace(0, 1, size)
    image = np.stack([np.broadcast_to(pixels[None, :], (size, size)), np.broadcast_to(pixels[:, None], (size, size)),
                      0.5 + 0.4 * np.sin(np.broadcast_to(pixels[None, :], (size, size)) * frequency)], axis=-1)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(host.base / "input" / name)


def fresh_python(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *arguments`` in a new interpreter from the repository root (where ``-c`` and ``-m`` find the harness,
    world and benchmarks), on one torch thread as the tests run: its exit status and text output."""
    return subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
