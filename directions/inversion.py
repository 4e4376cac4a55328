"""DDIM inversion: walk the sampler's own sigma schedule upward, so that sampling walks back.

The host's deterministic sampler (DDIM, i.e. Euler in sigma; x = x0 + sigma * eps for eps- and
v-prediction, the velocity form for flow models) steps from sigma_hi down to sigma_lo as

    x_lo = x_hi + d(x_hi, sigma_hi) (sigma_lo - sigma_hi),   d(x, s) = (x - D(x, s)) / s,

D being the model's denoised prediction. Inverting that step means solving

    x_hi = x_lo + d(x_hi, sigma_hi) (sigma_hi - sigma_lo)

for x_hi. Plain DDIM inversion evaluates d at the point it knows (x_lo, sigma_lo; at sigma 0 the
next sigma), which is where its drift comes from; fixed-point refinement (as in ReNoise and AIDI)
re-evaluates d at the current estimate of x_hi, each iteration shrinking the error by the
contraction factor of that map, so a few iterations remove most of it. One step costs 1 + refine
model evaluations. Derivation and contraction factor: docs/math.md, section 'DDIM inversion'.
"""
import torch


def inversion_step(denoise, x, sigma, sigma_next, refine: int = 0):
    """x at ``sigma`` -> x at the higher ``sigma_next`` that the sampling step maps back to x."""
    start = sigma if sigma > 0 else sigma_next
    upward = x + (x - denoise(x, start)) / start * (sigma_next - sigma)
    for _ in range(refine):
        upward = x + (upward - denoise(upward, sigma_next)) / sigma_next * (sigma_next - sigma)
    return upward


@torch.no_grad()
def invert(denoise, x, sigmas, refine: int = 0, callback=None):
    """Invert along ascending ``sigmas`` (0 or sigma_min first, sigma_max last); ``denoise(x, sigma)`` gives x0."""
    for i in range(len(sigmas) - 1):
        x = inversion_step(denoise, x, sigmas[i], sigmas[i + 1], refine)
        if callback is not None:
            callback(i, x)
    return x
