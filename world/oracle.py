"""The best possible denoiser of the faces world, to judge the trained model against its limit.

The generator is known, so the best estimate of a clean face x0 from a noisy one y = x0 + sigma * n
(the host's sigma, images in [-1, 1]) is the posterior mean E[render(f) | y] over the factors f,
uniform in [0, 1]^d, with likelihood exp(-|y - render(f)|^2 / (2 sigma^2)). No model can predict x0
with a smaller mean squared error.

The posterior is far too narrow for plain importance sampling from the prior, so it is reached by
sequential Monte Carlo with tempering (docs/math.md, section 'The oracle denoiser'): particles
drawn from the prior are moved through the posteriors with the likelihood raised to beta, 0 to 1,
each beta step chosen so that the reweighting keeps half the particles' effective size, then
resampled and moved by random-walk Metropolis steps that leave that posterior invariant. Its own
convergence is checked by running it twice (``agreement``).
"""
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .faces import FACTORS, render


@dataclass
class Posterior:
    mean: np.ndarray  # the posterior mean image, the renders' layout
    stages: int  # tempering steps from the prior to the posterior
    acceptance: float  # the Metropolis moves' acceptance rate at the last stage
    distinct: int  # distinct particles at the end: how many the mean averages


def world_render(factors: np.ndarray) -> np.ndarray:
    """[N, 7] factors -> [N, 32, 32, 3] float64 images in [-1, 1], the model's pixels."""
    return np.stack([render(row) for row in factors]).astype(np.float64) / 127.5 - 1


def _next_beta(log_likelihood: np.ndarray, beta: float, target: float) -> float:
    """The largest beta' <= 1 whose reweighting exp((beta' - beta) L) keeps an effective size >= target."""
    def ess(step):
        w = np.exp(step * (log_likelihood - log_likelihood.max()))
        return w.sum() ** 2 / np.square(w).sum()
    if ess(1.0 - beta) >= target:
        return 1.0
    low, high = 0.0, 1.0 - beta
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if ess(middle) >= target else (low, middle)
    return beta + max(low, 1e-12)


def _reflect(f: np.ndarray) -> np.ndarray:
    """Fold a proposal back into [0, 1]: a symmetric proposal stays symmetric on the box."""
    f = np.mod(f, 2.0)
    return np.where(f > 1.0, 2.0 - f, f)


def posterior_mean(noisy: np.ndarray, sigma: float, draw=world_render, dims: int = len(FACTORS),
                   particles: int = 512, moves: int = 6, seed: int = 0) -> Posterior:
    """E[draw(f) | noisy] for f uniform on [0, 1]^dims, by tempered sequential Monte Carlo."""
    if not (np.isfinite(noisy).all() and sigma > 0):
        raise ValueError("posterior_mean: noisy must be finite and sigma > 0")
    rng = np.random.default_rng(seed)
    y = noisy.astype(np.float64).reshape(-1)

    def log_likelihood(images):
        return -np.square(images.reshape(len(images), -1) - y).sum(1) / (2 * sigma ** 2)

    f = rng.random((particles, dims))
    images = draw(f)
    loglik = log_likelihood(images)
    beta, stages, scale, acceptance = 0.0, 0, 0.5, 1.0
    while beta < 1.0:
        new_beta = _next_beta(loglik, beta, particles / 2)
        weights = np.exp((new_beta - beta) * (loglik - loglik.max()))
        weights /= weights.sum()
        chosen = np.searchsorted(np.cumsum(weights), (rng.random() + np.arange(particles)) / particles)
        chosen = np.minimum(chosen, particles - 1)  # systematic resampling
        f, images, loglik, beta = f[chosen], images[chosen], loglik[chosen], new_beta
        stages += 1
        spread = np.cov(f.T) + 1e-10 * np.eye(dims)
        root = np.linalg.cholesky(spread)
        accepted = 0
        for _ in range(moves):
            proposal = _reflect(f + scale * rng.standard_normal((particles, dims)) @ root.T)
            proposal_images = draw(proposal)
            proposal_loglik = log_likelihood(proposal_images)
            accept = np.log(rng.random(particles)) < beta * (proposal_loglik - loglik)
            f[accept], images[accept] = proposal[accept], proposal_images[accept]
            loglik[accept] = proposal_loglik[accept]
            accepted += int(accept.sum())
        acceptance = accepted / (moves * particles)
        scale *= np.exp(acceptance - 0.25)  # towards a quarter accepted
    distinct = len(np.unique(f, axis=0))
    return Posterior(mean=images.mean(0), stages=stages, acceptance=acceptance, distinct=distinct)


def _mean_image(task: tuple) -> np.ndarray:
    noisy, sigma, seed = task
    return posterior_mean(noisy, sigma, seed=seed).mean


def posterior_means(tasks: list) -> list:
    """``posterior_mean(noisy, sigma, seed=seed).mean`` for each (noisy, sigma, seed) of ``tasks``, in order,
    a process per core: the runs are independent and single-threaded."""
    workers = min(len(tasks), len(os.sched_getaffinity(0)))
    if workers < 2:
        return [_mean_image(task) for task in tasks]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_mean_image, tasks))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [-1, 1], measured as [0, 1] images."""
    mse = float(np.square((np.asarray(a, np.float64) - np.asarray(b, np.float64)) / 2).mean())
    return 10 * np.log10(1 / max(mse, 1e-12))
