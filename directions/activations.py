"""Directions from a site's recorded activations: principal directions across samples (Asyrp's
h-space analysis, and the same at attention inputs), and the mean difference of a pair of batches
(a named direction: prompts or examples with and without an attribute).

Asyrp: Kwon, Jeong, Uh, "Diffusion Models Already Have a Semantic Latent Space" (arXiv 2210.10960).
The computations: docs/math.md, sections 'Principal directions of a site' and 'Pair directions'.
Features are [T, S, C]: for each of T timesteps, one C-vector per sample (the site's tokens
averaged over positions), as the caller recorded them.
"""
import torch

from .attention import fix_signs

SPAN_TOLERANCE = 1e-10  # a spread below this fraction of the first (float64) is rounding: outside the rows' span


def _check(name: str, features: torch.Tensor, least: int) -> None:
    if features.ndim != 3 or features.shape[1] < least or features.shape[0] < 1:
        raise ValueError(f"{name}: expected [timesteps >= 1, samples >= {least}, channels], got {list(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: the recorded activations hold NaN or infinite values")


@torch.no_grad()
def principal_directions(features: torch.Tensor, count: int):
    """Top ``count`` principal directions [count, C] and their standard deviations [count].

    Each timestep is centred on its own mean first, so the directions describe how samples differ,
    not how the activations drift with the noise level. That leaves at most T (S - 1) independent rows (fewer
    when samples repeat): beyond the rows' span a direction would have no spread and no meaning, so fewer than
    ``count`` come back then.
    """
    _check("features", features, 2)
    if count < 1:
        raise ValueError(f"count: expected at least 1 direction, got {count}")
    features = features.double()
    centred = (features - features.mean(dim=1, keepdim=True)).flatten(0, 1)
    _, values, vh = torch.linalg.svd(centred, full_matrices=False)
    if not values[0] > 0:
        raise ValueError("features: the samples' activations are the same at every recorded step, so they have no "
                         "directions of variation; sample different images (other seeds, or add_noise on)")
    count = min(count, int((values > values[0] * SPAN_TOLERANCE).sum()))
    spread = values[:count] / (centred.shape[0] - features.shape[0]) ** 0.5
    return fix_signs(vh[:count]).float(), spread.float()


@torch.no_grad()
def mean_difference(source: torch.Tensor, target: torch.Tensor, scale: float):
    """The unit direction [C] from the source batch's mean to the target's, and its length in units of
    ``scale`` (the site's RMS token norm), so that a shift of that many units reproduces the difference.

    ``source`` [T, S, C] and ``target`` [T, S', C] are recorded at the same T timesteps; each is averaged
    over its samples and timesteps (float64).
    """
    _check("source", source, 1)
    _check("target", target, 1)
    if source.shape[0] != target.shape[0] or source.shape[2] != target.shape[2]:
        raise ValueError(f"target: recorded at {target.shape[0]} steps with {target.shape[2]} channels, but the source "
                         f"at {source.shape[0]} with {source.shape[2]}; record both with the same steps and site")
    difference = target.double().mean((0, 1)) - source.double().mean((0, 1))
    length = float(difference.norm())
    if not scale > 0:
        raise ValueError(f"scale: expected the site's RMS token norm, a positive number, got {scale}")
    if length == 0:
        raise ValueError("target: its activations equal the source's at this site, so there is no direction between "
                         "them; use prompts or examples that differ")
    return (difference / length).float(), length / scale
