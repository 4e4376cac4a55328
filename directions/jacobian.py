"""Directions from one image: the top right singular vectors of the Jacobian of the model's denoised
output with respect to a shift at a site (the Pullback / LOCO-Edit idea), optionally weighted to a
region of the image (LOCO-Edit's localized edits).

The caller supplies the Jacobian's columns, J e_c for every channel c of the site (forward-mode
derivatives of the host's model: docs/math.md, section 'Jacobian directions'); J is m x C with C the
site's width (at most a few thousand) and m the latent's size, so it is decomposed exactly.
"""
import torch

from .attention import fix_signs


@torch.no_grad()
def jacobian_directions(columns: torch.Tensor, count: int, row_weights: torch.Tensor | None = None):
    """Top ``count`` right singular vectors [count, C] of J ([m, C]) and their singular values [count]: the
    unit shifts that change the output most, and by how much (output norm per unit shift). ``row_weights``
    [m] in [0, 1] weights each output entry (a mask): the directions then maximise the weighted change."""
    if columns.ndim != 2 or columns.shape[1] < 1:
        raise ValueError(f"columns: expected a Jacobian [outputs, channels], got {list(columns.shape)}")
    if not torch.isfinite(columns).all():
        raise ValueError("columns: the Jacobian holds NaN or infinite values")
    if count < 1:
        raise ValueError(f"count: expected at least 1 direction, got {count}")
    jacobian = columns.double()
    if row_weights is not None:
        jacobian = jacobian * row_weights.double()[:, None]
    values, vectors = torch.linalg.eigh(jacobian.T @ jacobian)  # C x C, float64: singular values to ~1e-8 relative
    count = min(count, columns.shape[1])
    top = values.flip(0)[:count].clamp(min=0).sqrt()
    return fix_signs(vectors.flip(1)[:, :count].T).float(), top.float()
