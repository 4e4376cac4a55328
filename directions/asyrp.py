"""The asymmetric reverse process (Asyrp), as a sampler over the host's sigma schedule.

DESIGN.md section 4. Editing the noise prediction in both halves of a DDIM step cancels to first
order, so inside the edit interval the predicted x0 comes from the edited model and the noise
direction from the unedited one (x = x0 + sigma * eps, eta = 0):

    x_next = x0_edited + sigma_next * eps_original,   eps_original = (x - x0_original) / sigma.

Outside the interval this is the host's deterministic DDIM (Euler in sigma). An optional late
interval adds fresh noise with strength ``eta`` (Asyrp's quality boost).
"""
import torch


def ancestral_split(sigma, sigma_next, eta: float):
    """(sigma_down, sigma_up) for a step with noise of strength eta (0: deterministic DDIM)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def asyrp_step(x, sigma, sigma_next, x0_edited, x0_original, eta: float = 0.0, noise=None, flow: bool = False):
    """One step: x0 from the edited prediction, the direction from the original one.

    Written as the host's Euler update plus the edit's x0 change, so with the edit off it is
    bit-identical to the host's ddim sampler. Flow models (x = (1 - sigma) x0 + sigma eps) carry
    x0 with weight 1 - sigma_next, so there the change is scaled by it.
    """
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
    direction = (x - x0_original) / sigma
    x = x + direction * (sigma_down - sigma)
    if x0_edited is not x0_original:
        x = x + (x0_edited - x0_original) * ((1 - sigma_down) if flow else 1)
    if sigma_up:
        x = x + noise * sigma_up
    return x


@torch.no_grad()
def sample_asyrp(denoise, denoise_pair, x, sigmas, edit_active, eta: float = 0.0, boost_below: float = 0.0,
                 noise_sampler=None, callback=None, flow: bool = False):
    """Sample along ``sigmas``. ``denoise(x, sigma)`` gives x0; inside the edit interval
    (``edit_active(sigma)``) ``denoise_pair(x, sigma)`` gives (x0_edited, x0_original) from one
    batched call. Noise of strength ``eta`` is added on steps with sigma <= ``boost_below``.
    ``flow`` marks flow-matching models (see :func:`asyrp_step`).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if edit_active(sigma):
            edited, original = denoise_pair(x, sigma)
        else:
            edited = original = denoise(x, sigma)
        step_eta = eta if sigma <= boost_below else 0.0
        noise = noise_sampler(sigma, sigma_next) if step_eta and sigma_next > 0 else None
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": edited})
        x = asyrp_step(x, sigma, sigma_next, edited, original, step_eta, noise, flow)
    return x
