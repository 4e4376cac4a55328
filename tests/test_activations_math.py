"""Directions from recorded activations on plain tensors: planted directions come back; pair differences."""
import pytest
import torch

from semantic_directions.directions.activations import mean_difference, principal_directions


def test_planted_directions_come_back_in_order_of_spread_despite_a_drift_over_timesteps():
    generator = torch.Generator().manual_seed(0)
    planted = torch.linalg.qr(torch.randn(64, 2, generator=generator)).Q.T  # two orthonormal directions
    timesteps, samples = 10, 200
    drift = 50 * torch.randn(timesteps, 1, 64, generator=generator)  # h moves with the noise level
    amounts = torch.randn(timesteps, samples, 2, generator=generator) * torch.tensor([3.0, 1.5])
    features = drift + amounts @ planted + 0.05 * torch.randn(timesteps, samples, 64, generator=generator)
    vectors, spread = principal_directions(features, 3)
    # computed in float64 and rounded to float32 once: unit to about 1e-7
    assert vectors.shape == (3, 64) and torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert abs(float(vectors[0] @ planted[0])) > 0.999 and abs(float(vectors[1] @ planted[1])) > 0.999
    assert spread[0] == pytest.approx(3.0, rel=0.05) and spread[1] == pytest.approx(1.5, rel=0.05)
    assert spread[2] < 0.1
    assert (vectors.gather(1, vectors.abs().argmax(1, keepdim=True)) > 0).all()  # reproducible signs


def test_no_more_directions_than_the_samples_span():
    """Two samples on two steps, centred per step, span two directions: the rest would be arbitrary."""
    features = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(2))
    vectors, spread = principal_directions(features, 8)
    assert vectors.shape == (2, 16) and bool((spread > 0.1).all())
    assert principal_directions(torch.randn(3, 40, 5), 8)[0].shape == (5, 5)  # nor more than the channels


def test_samples_all_alike_have_no_directions_and_repeated_ones_add_none():
    with pytest.raises(ValueError, match="features: the samples' activations are the same at every recorded step"):
        principal_directions(torch.ones(3, 4, 16), 2)
    two = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(3))
    repeated = torch.cat([two, two, two], dim=1)  # 6 samples, 2 distinct per step: 3 directions, not 8
    assert principal_directions(repeated, 8)[0].shape == (3, 16)


def test_too_few_samples_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"features: expected \[timesteps >= 1, samples >= 2, channels\]"):
        principal_directions(torch.zeros(4, 1, 8), 2)


def test_a_count_below_one_is_refused():
    with pytest.raises(ValueError, match="count: expected at least 1 direction, got 0"):
        principal_directions(torch.randn(4, 8, 8), 0)


def test_the_pair_direction_is_the_normalised_difference_of_means_and_its_length_in_site_units():
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(5, 7, 32, generator=generator, dtype=torch.float64)
    target = torch.randn(5, 3, 32, generator=generator, dtype=torch.float64) + 2.0
    vector, strength = mean_difference(source.float(), target.float(), scale=4.0)
    expected = target.mean((0, 1)) - source.mean((0, 1))  # float64, computed independently of the batch layout
    # float32 inputs averaged in float64: the direction to float32 rounding of inputs of size ~3
    assert torch.allclose(vector.double(), expected / expected.norm(), atol=1e-6)
    assert strength == pytest.approx(float(expected.norm()) / 4.0, rel=1e-6)


def test_a_pair_without_a_difference_or_of_other_steps_is_refused():
    same = torch.ones(4, 2, 8)
    with pytest.raises(ValueError, match="target: its activations equal the source's at this site"):
        mean_difference(same, same.clone(), scale=1.0)
    with pytest.raises(ValueError, match="target: recorded at 3 steps with 8 channels, but the source at 4 with 8"):
        mean_difference(same, torch.zeros(3, 2, 8), scale=1.0)
    with pytest.raises(ValueError, match="source: the recorded activations hold NaN"):
        mean_difference(torch.full((4, 2, 8), float("nan")), same, scale=1.0)
    with pytest.raises(ValueError, match="scale: expected the site's RMS token norm, a positive number, got nan"):
        mean_difference(same, same + 1, scale=float("nan"))
