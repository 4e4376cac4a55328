"""The semantics benchmark's statistics, free of the host and the world so that tests can check them
on cases whose answer is known: slopes of factor readings against alpha, bootstrap intervals over
seeds, and the supervised ceiling directions of a site. Derivations: docs/math.md, section 'Slopes,
effect and purity'; docs/math.md, section 'Bootstrap intervals'; docs/math.md, section 'Ceiling
directions of a site'.
"""
import numpy as np


def seed_slopes(base: np.ndarray, swept: np.ndarray, alphas) -> np.ndarray:
    """Least-squares slope through the origin of each factor's change against alpha, per seed:
    base [S, F] (alpha 0), swept [S, A, F] -> [S, F]."""
    a = np.asarray(alphas, np.float64)[None, :, None]
    return ((swept - base[:, None]) * a).sum(1) / np.square(a).sum()


def effect(slopes: np.ndarray) -> float:
    """A direction's effect: the largest |slope| of one factor ([F], factor units per unit alpha)."""
    return float(np.abs(slopes).max())


def purity(slopes: np.ndarray, factor: int | None = None) -> float:
    """The share of ``factor`` (default: the one moved most) in the summed |slope| over all factors."""
    magnitudes = np.abs(slopes)
    chosen = int(magnitudes.argmax()) if factor is None else factor
    return float(magnitudes[chosen] / max(magnitudes.sum(), 1e-12))


def bootstrap_resamples(seeds: int, count: int = 2000, seed: int = 0) -> np.ndarray:
    """[count, seeds] indices: seeds drawn with replacement, the same draws for every statistic compared."""
    return np.random.default_rng(seed).integers(0, seeds, (count, seeds))


def interval(values: np.ndarray, level: float = 0.95) -> list:
    """The central ``level`` percentile interval of bootstrap ``values``."""
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap_interval(statistic, per_seed: dict, resamples: np.ndarray, level: float = 0.95) -> list:
    """Bootstrap interval of ``statistic({key: mean slopes [F]})``, ``per_seed`` mapping keys to per-seed
    slopes [S, F]: the statistic recomputed on each resample of the seeds (the same rows for every key)."""
    keys = list(per_seed)
    stacked = np.stack([per_seed[k] for k in keys])  # [K, S, F]
    values = [statistic(dict(zip(keys, stacked[:, rows].mean(1)))) for rows in resamples]
    return interval(np.asarray(values, np.float64), level)


def ceiling_directions(gradients: np.ndarray) -> dict:
    """Supervised directions from ``gradients`` [F, D], each factor's change per unit shift along each of D
    axes (linearised at no edit). For each factor f, (kind, f) -> unit [D]:

    - ``"strongest"``: the gradient itself, the direction that moves f most per unit norm;
    - ``"pure"``: the gradient with the other factors' gradients projected out, the direction that moves
      f most among those that, to first order, move no other factor (None where f's gradient lies in
      the others' span).
    """
    gradients = np.asarray(gradients, np.float64)
    directions = {}
    for f, row in enumerate(gradients):
        directions[("strongest", f)] = row / max(np.linalg.norm(row), 1e-300)
        _, singular, basis = np.linalg.svd(np.delete(gradients, f, axis=0), full_matrices=False)
        span = basis[singular > 1e-10 * np.abs(gradients).max()]  # the other factors' gradients' row space
        residual = row - span.T @ (span @ row)
        pure = np.linalg.norm(residual)
        directions[("pure", f)] = residual / pure if pure > 1e-8 * np.linalg.norm(row) else None
    return directions
