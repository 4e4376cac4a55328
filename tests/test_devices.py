"""The library makes every tensor on its inputs' device (users' are GPUs; CI has none). Each call runs on CPU
inputs with torch's factories defaulting to another device (meta): a tensor made without its inputs' device
then lands there and cannot mix with them, as a CPU tensor cannot mix with a GPU's."""
import pytest
import torch
from directions_testing import randn, random_layer

from semantic_directions.directions.activations import mean_difference, principal_directions
from semantic_directions.directions.asyrp import sample_asyrp
from semantic_directions.directions.attention import METHODS, attention_directions
from semantic_directions.directions.inversion import anderson_solve, invert
from semantic_directions.directions.jacobian import jacobian_directions
from semantic_directions.directions.projection import project_out
from semantic_directions.directions.svd import scale_singular_value, subspace_distance, transfer_attribute


def gaussian_denoiser(x, sigma):
    """The exact denoiser of unit Gaussian data: its inversion has a closed form, so results can be checked."""
    return x / (1 + sigma ** 2)


def layer(width, heads):
    return random_layer(width, heads, dtype=torch.float32)


def jacobian():
    matrix, weights = randn(80, 96), torch.rand(80, generator=torch.Generator().manual_seed(1))
    return lambda: jacobian_directions(lambda v: matrix @ v, lambda u: matrix.T @ u, 96, 3, weights)[0]


def asyrp():
    x, sigmas = randn(1, 4, 4, 4), torch.linspace(14, 0, 5)
    return lambda: sample_asyrp(gaussian_denoiser, lambda y, s: (gaussian_denoiser(y, s),) * 2, x, sigmas,
                                lambda sigma: True)


def call(function, *arguments, first=True, **options):
    """The call to make with inputs made now, on the CPU (the first of its outputs when it returns several)."""
    return lambda: (lambda out: out[0] if first else out)(function(*arguments, **options))


# each entry makes its inputs on the CPU and returns the call to time under the other default device
CALLS = {
    "anderson": lambda: call(anderson_solve, lambda y: 0.5 * y + 1, torch.zeros(2, 3), 8),
    "invert refined": lambda: call(invert, gaussian_denoiser, randn(1, 4, 4, 4), torch.linspace(0, 14, 6), 2,
                                   first=False),
    **{f"discover {method}": (lambda method=method: call(attention_directions, layer(96, 2), 4, method))
       for method in METHODS},
    "discover above the exact width": lambda: call(attention_directions, layer(320, 5), 4, "value"),
    "jacobian": jacobian,
    "principal directions": lambda: call(principal_directions, randn(3, 5, 16), 4),
    "mean difference": lambda: call(mean_difference, randn(2, 4, 16), randn(2, 3, 16, seed=2), 2.0),
    "project out": lambda: call(project_out, torch.nn.functional.normalize(randn(3, 16), dim=1),
                                torch.nn.functional.normalize(randn(2, 16, seed=2), dim=1)),
    "svd explore": lambda: call(scale_singular_value, randn(1, 4, 8, 8), 0, 2.0, first=False),
    "svd distance": lambda: call(subspace_distance, randn(4, 8, 8), randn(4, 8, 8, seed=2), 2, first=False),
    "svd attribute": lambda: call(transfer_attribute, randn(1, 4, 8, 8), randn(1, 4, 8, 8, seed=2), 4, 2,
                                  iterations=3, first=False),
    "asyrp": asyrp,
}


@pytest.mark.parametrize("name", CALLS)
def test_every_tensor_is_made_on_the_inputs_device(name):
    run = CALLS[name]()
    with torch.device("meta"):
        result = run()
    assert result.device.type == "cpu" and bool(torch.isfinite(result).all())
