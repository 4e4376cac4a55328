"""Directions from an image (or a batch, their Jacobians stacked): the top right singular vectors of the
Jacobian of the model's denoised output with respect to a shift at a site (the Pullback / LOCO-Edit idea),
optionally weighted to a region of the image (LOCO-Edit's localized edits).

The caller supplies J as products, never formed: v -> J v (forward-mode derivatives of the host's
model) and u -> J^T u (reverse mode), each on blocks of vectors; block Krylov iteration on J^T J
finds the top directions in a few blocks of products where forming J takes one model row per
channel (docs/math.md, section 'Jacobian directions').
"""
import torch

from .attention import top_right_singular

TOLERANCE = 2e-2  # Ritz residual over Ritz value: each gain within 1% of a singular value (half-precision models too)
EXACT_WIDTH = 64  # narrower sites are formed (a model row per channel): no dearer than a few blocks of products
NEGLIGIBLE = 1e-3  # gains under 3% of the top one need only be that small: a small mask leaves J of rank below count


@torch.no_grad()
def jacobian_directions(apply, apply_t, width: int, count: int, row_weights: torch.Tensor | None = None,
                        stacked: int = 1):
    """Top ``count`` right singular vectors [count, C] of J and their singular values [count]: the unit
    shifts that change the output most, and by how much (output norm per unit shift). ``apply``: v [C, p]
    -> J v [m, p]; ``apply_t``: u [m, p] -> J^T u [C, p], or None to form J from ``apply`` (C products);
    float32 CPU tensors in and out. ``row_weights``
    [m] in [0, 1] weights each output entry (a mask): the directions then maximise the weighted change.
    ``stacked``: J is that many Jacobians stacked (a batch's images); the gains are then per Jacobian, in root
    mean square (the singular values over sqrt(stacked)), on one image's scale (docs/math.md, 'Jacobian
    directions')."""
    if width < 1:
        raise ValueError(f"width: expected a site with at least one channel, got {width}")
    if count < 1:
        raise ValueError(f"count: expected at least 1 direction, got {count}")

    def checked(products):
        if not torch.isfinite(products).all():
            raise ValueError("model: its prediction's derivative holds NaN or infinite values at this point of "
                             "the schedule; check the model (or the LoRA's strength) and the latent")
        return products

    def weighted(outputs):
        return outputs if row_weights is None else outputs * row_weights[:, None]

    def forward(vectors):
        return weighted(checked(apply(vectors)))

    def backward(outputs):
        return checked(apply_t(weighted(outputs)))
    if stacked < 1:
        raise ValueError(f"stacked: expected at least 1 Jacobian, got {stacked}")
    vectors, values = top_right_singular(forward, backward, width, count, like=torch.empty(0, device="cpu"),
                                         tolerance=TOLERANCE, exact_width=EXACT_WIDTH if apply_t is not None else width,
                                         blocks_per_check=1, floor=NEGLIGIBLE)
    return vectors, values / stacked ** 0.5
