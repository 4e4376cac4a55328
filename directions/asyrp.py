"""The asymmetric reverse process (Asyrp), as a sampler over the host's sigma schedule.

Kwon, Jeong, Uh, "Diffusion Models Already Have a Semantic Latent Space" (arXiv 2210.10960);
docs/math.md, section 'The Asyrp asymmetric step'. Editing the noise prediction in both halves
of a DDIM step cancels to first order, so inside the edit interval the predicted x0 comes from
the edited model and the noise direction from the unedited one (x = x0 + sigma * eps, eta = 0):

    x_next = x0_edited + sigma_next * eps_original,   eps_original = (x - x0_original) / sigma.

Outside the interval this is the host's deterministic DDIM (Euler in sigma). An optional late
interval adds fresh noise with strength ``eta`` (Asyrp's quality boost), split from the step by
the caller's ancestral rule.
"""
import torch


def asyrp_step(x, sigma, sigma_down, x0_edited, x0_original, flow: bool = False):
    """One step down to ``sigma_down``: x0 from the edited prediction, the direction from the original one.

    Written as the Euler (DDIM) update plus the edit's x0 change, so with the edit off it is
    bit-identical to a plain DDIM step. Flow models (x = (1 - sigma) x0 + sigma eps) carry x0 with
    weight 1 - sigma_down, so there the change is scaled by it.
    """
    direction = (x - x0_original) / sigma
    x = x + direction * (sigma_down - sigma)
    if x0_edited is not x0_original:
        x = x + (x0_edited - x0_original) * ((1 - sigma_down) if flow else 1)
    return x


@torch.no_grad()
def sample_asyrp(denoise, denoise_pair, x, sigmas, edit_active, eta: float = 0.0, boost_below: float = 0.0,
                 noise_sampler=None, callback=None, flow: bool = False, split=None):
    """Sample along ``sigmas``. ``denoise(x, sigma)`` gives x0; inside the edit interval
    (``edit_active(sigma)``) ``denoise_pair(x, sigma)`` gives (x0_edited, x0_original) from one
    batched call. Noise of strength ``eta`` is added on steps with sigma <= ``boost_below``, split
    from the step by ``split(sigma, sigma_next, eta) -> (sigma_down, sigma_up)`` (the caller's
    ancestral rule; needed only when ``eta`` is not 0). ``flow`` marks flow-matching models (see :func:`asyrp_step`).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if edit_active(sigma):
            edited, original = denoise_pair(x, sigma)
        else:
            edited = original = denoise(x, sigma)
        sigma_down, sigma_up = split(sigma, sigma_next, eta) if eta and sigma <= boost_below else (sigma_next, 0.0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": edited})
        x = asyrp_step(x, sigma, sigma_down, edited, original, flow)
        if sigma_up:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
    return x
