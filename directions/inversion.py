"""DDIM inversion: walk the sampler's own sigma schedule upward, so that sampling walks back.

The host's deterministic sampler (DDIM, i.e. Euler in sigma; x = x0 + sigma * eps for eps- and
v-prediction, the velocity form for flow models) steps from sigma_hi down to sigma_lo as

    x_lo = x_hi + d(x_hi, sigma_hi) (sigma_lo - sigma_hi),   d(x, s) = (x - D(x, s)) / s,

D being the model's denoised prediction. Inverting that step means solving the fixed point

    x_hi = F(x_hi) = x_lo + d(x_hi, sigma_hi) (sigma_hi - sigma_lo)

for x_hi. Plain DDIM inversion evaluates d at the point it knows (x_lo, sigma_lo), which is where its
drift comes from. With a budget of ``1 + refine`` model evaluations per step on average, ``invert``
spends them where the error is (docs/math.md, section 'DDIM inversion'): each step starts from its
slope extrapolated from the two steps below it and solves its fixed point with Anderson acceleration
until the residual is small or its share of the spare calls is spent, so the lowest steps, whose maps
contract slowest (the first must find the point whose denoised prediction is the image), get most.
"""
import math

import torch

TOLERANCE = 3e-4  # a step stops once its fixed-point residual |F(y) - y| / max(|y|, |F(y)|) is below this
ANDERSON_MEMORY = 5
SPARE_SPLIT = 8  # a step may use one call and 1/8 of the spare (bench_invert.py: 2 starves upper steps, 12 the lowest)


def plain_step(denoise, x, sigma, sigma_next):
    """Plain DDIM inversion: the slope at the known end (at sigma 0, where it is undefined, at sigma_next)."""
    start = sigma if sigma > 0 else sigma_next
    return x + (x - denoise(x, start)) / start * (sigma_next - sigma)


def anderson_solve(fixed_map, start, evaluations: int, tolerance: float = 0.0, memory: int = ANDERSON_MEMORY):
    """y = fixed_map(y) for each batch row, from ``start``, in at most ``evaluations`` calls, stopping once every
    row's residual g = fixed_map(y) - y is below ``tolerance`` relative to the larger of |y| and |fixed_map(y)|
    (Anderson
    acceleration, type II, undamped: each new point is the fixed-map image of the combination of the last
    ``memory`` + 1 points whose residuals cancel best, in least squares). Returns (the point after the last
    call, each call's relative residual [calls, batch])."""
    batch = start.shape[0]
    points, residuals, norms = [], [], []
    y = start
    for _ in range(evaluations):
        mapped = fixed_map(y)
        g = (mapped - y).reshape(batch, -1)
        scale = torch.maximum(y.reshape(batch, -1).norm(dim=1), mapped.reshape(batch, -1).norm(dim=1))
        norms.append(g.norm(dim=1) / scale.clamp_min(torch.finfo(g.dtype).tiny))
        points, residuals = (points + [y.reshape(batch, -1)])[-memory - 1:], (residuals + [g])[-memory - 1:]
        if len(points) == 1 or norms[-1].max() <= tolerance:
            y = mapped
        else:
            delta_g = torch.stack([b - a for a, b in zip(residuals, residuals[1:])], dim=2).double()  # [B, n, m]
            delta_y = torch.stack([b - a for a, b in zip(points, points[1:])], dim=2).double()
            gram = delta_g.transpose(1, 2) @ delta_g
            ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-300)[:, None, None]
            gamma = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device),
                                       delta_g.transpose(1, 2) @ g.double()[..., None])
            y = (points[-1] + g - ((delta_y + delta_g) @ gamma)[..., 0].to(g.dtype)).reshape(start.shape)
        if norms[-1].max() <= tolerance:
            break
    return y, torch.stack(norms)


def finite(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x``, or a one-line error: a model whose prediction holds NaN would otherwise give a NaN latent."""
    if not torch.isfinite(x).all():
        raise ValueError(f"model: its prediction holds NaN or infinite values at sigma {sigma:.4g}; check the model "
                         f"(or a LoRA's strength), the latent and the conditioning")
    return x


def extrapolated_slope(slopes, sigmas, target):
    """The slope at ``target`` extrapolated linearly in log sigma from the last two (sigma, slope) pairs."""
    if len(slopes) < 2 or sigmas[-1] == sigmas[-2]:  # a schedule may repeat a sigma (more steps than timesteps)
        return slopes[-1]
    weight = (math.log(target) - math.log(sigmas[-1])) / (math.log(sigmas[-1]) - math.log(sigmas[-2]))
    return slopes[-1] + (slopes[-1] - slopes[-2]) * weight


@torch.no_grad()
def invert(denoise, x, sigmas, refine: int = 0, callback=None):
    """Invert along ascending ``sigmas`` (0 or sigma_min first, sigma_max last); ``denoise(x, sigma)`` gives
    x0. ``refine``: model evaluations per step beyond plain inversion's one, at most, on average (0 is plain
    DDIM inversion). ``callback(i, x, residual)`` after each step, ``residual`` [batch] being that step's
    relative fixed-point residual at its last evaluated point (None for plain inversion)."""
    steps = len(sigmas) - 1
    sigmas = [float(s) for s in sigmas]
    if refine == 0:
        for i in range(steps):
            x = finite(plain_step(denoise, x, sigmas[i], sigmas[i + 1]), sigmas[i + 1])
            if callback is not None:
                callback(i, x, None)
        return x
    budget = (1 + refine) * steps
    slopes, slope_sigmas = [], []
    for i in range(steps):
        low, high = sigmas[i], sigmas[i + 1]
        evaluated = []

        def fixed_map(y, x=x, low=low, high=high):
            evaluated.append((y - denoise(y, high)) / high)
            return x + evaluated[-1] * (high - low)
        start = x if i == 0 else x + extrapolated_slope(slopes, slope_sigmas, high) * (high - low)
        remaining = steps - i
        calls = 1 + (budget - remaining) // min(SPARE_SPLIT, remaining)  # every later step keeps one call
        x, residuals = anderson_solve(fixed_map, start, calls, TOLERANCE)
        x = finite(x, high)
        budget -= len(residuals)
        slopes, slope_sigmas = slopes[-1:] + evaluated[-1:], slope_sigmas[-1:] + [high]
        if callback is not None:
            callback(i, x, residuals[-1])
    return x
