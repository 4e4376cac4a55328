"""Library layer: channel-wise SVD, Explore's scaling, subspace distances and the attribute fit on plain tensors."""
import pytest
import torch
from directions_testing import assert_float32_close

from semantic_directions.directions.svd import (
    AttributeWeights,
    channel_svd,
    components,
    scale_singular_value,
    subspace_distance,
    transfer_attribute,
)


def latent(seed, shape=(1, 4, 64, 64)):
    """Low-rank structure plus noise, like a latent part way through sampling."""
    generator = torch.Generator().manual_seed(seed)
    structure = torch.randn(*shape[:2], shape[2], 6, generator=generator) @ torch.randn(*shape[:2], 6, shape[3],
                                                                                        generator=generator)
    return structure + 0.5 * torch.randn(*shape, generator=generator)


def test_channel_svd_reconstructs_the_latent():
    x = latent(0, (2, 4, 48, 64))
    u, s, vh = channel_svd(x)
    assert s.shape == (2, 4, 48)
    # a float32 SVD reconstructs to a few ulps of the largest singular value (here 6x the largest entry)
    assert_float32_close(components(u, s, vh), x, scale=float(s.max()))


def test_explore_factor_one_is_exact_and_other_components_are_untouched():
    x = latent(1)
    assert torch.equal(scale_singular_value(x, 3, 1.0), x)
    u, s, vh = channel_svd(x)
    doubled = scale_singular_value(x, 3, 2.0, channel=2)
    assert torch.equal(doubled[:, [0, 1, 3]], x[:, [0, 1, 3]])
    expected = s[0, 2].clone()
    expected[3] *= 2
    # float32 singular values are accurate to ulps of the largest, not of each: the smallest is 1/2500 of it
    expected = expected.sort(descending=True).values
    assert_float32_close(torch.linalg.svdvals(doubled[0, 2]), expected, scale=float(expected[0]))
    removed = scale_singular_value(x, 0, 0.0)
    assert_float32_close(torch.linalg.svdvals(removed[0]), torch.cat([s[0, :, 1:], torch.zeros(4, 1)], -1),
                         scale=float(s[0].max()))


def test_subspace_distance():
    x = latent(2)
    # float64 inside: the angles of equal subspaces are arccos of 1 - rounding, about sqrt(2e-16) = 1.5e-8
    assert torch.allclose(subspace_distance(x, x, 6), torch.zeros(1, 4), atol=1e-6)
    other = latent(3)
    far = subspace_distance(x, other, 6)
    assert torch.allclose(far, subspace_distance(other, x, 6), atol=1e-4)
    near = subspace_distance(x, x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4)), 6)
    assert (near < 0.2 * far).all() and (far > 1).all()  # unrelated latents: several large principal angles


def optimum(x, z, k, m, weights, keep_rest):
    """The fit's exact minimiser: the loss is quadratic in the coefficients, channel by channel."""
    x, z = x.double(), z.double()
    ux, sx, vhx = channel_svd(x)
    uz, sz, vhz = channel_svd(z)
    basis = torch.cat([torch.einsum("bchi,bciw->bchwi", ux[..., :k], vhx[..., :k, :]),
                       torch.einsum("bchj,bcjw->bchwj", uz[..., :m], vhz[..., :m, :])], dim=-1).flatten(2, 3)
    rest = (x - components(ux[..., :k], sx[..., :k], vhx[..., :k, :]) if keep_rest else torch.zeros_like(x)).flatten(2)
    initial = torch.cat([sx[..., :k], sz[..., :m]], -1)
    a_t, a_s = weights.target / z.pow(2).sum(), weights.source / x.pow(2).sum()
    regulariser = torch.cat([torch.full((k,), weights.source_values / sx[..., :k].pow(2).sum()),
                             torch.full((m,), weights.target_values / sz[..., :m].pow(2).sum())])
    gram = (a_t + a_s) * basis.transpose(-1, -2) @ basis + torch.diag(regulariser)
    rhs = (basis.transpose(-1, -2) @ (a_t * (z.flatten(2) - rest) + a_s * (x.flatten(2) - rest))[..., None])[..., 0]
    coefficients = torch.linalg.solve(gram, rhs + regulariser * initial)
    return (rest + (basis @ coefficients[..., None])[..., 0]).reshape(x.shape).float()


@pytest.mark.parametrize("keep_rest", [True, False])
def test_the_mlp_fit_reaches_the_exact_optimum(keep_rest):
    x, z = latent(5), latent(6)
    weights = AttributeWeights()
    fitted = transfer_attribute(x, z, 16, 8, weights, keep_rest=keep_rest)
    best = optimum(x, z, 16, 8, weights, keep_rest)
    assert float((fitted - best).norm() / (x - z).norm()) < 0.02


def test_source_and_target_losses_pull_where_they_say():
    x, z = latent(7), latent(8)

    def distances(**weights):
        y = transfer_attribute(x, z, 16, 8, AttributeWeights(**weights))
        return float((y - x).norm() / (z - x).norm()), float((y - z).norm() / (z - x).norm())
    source_only = distances(target=0, source=1, target_values=0, source_values=0)
    target_only = distances(target=1, source=0, target_values=0, source_values=0)
    both = distances(target=1, source=1, target_values=0, source_values=0)
    print("distance to source, to target (relative to |z - x|):", source_only, target_only, both)
    assert source_only[0] < 0.01
    assert target_only[1] < 0.9 * source_only[1] and target_only[0] > 0.1
    assert target_only[0] > both[0] > source_only[0] and source_only[1] > both[1] > target_only[1]


def test_the_fit_is_deterministic_and_leaves_its_inputs_alone():
    x, z = latent(9), latent(10)
    x_before, z_before = x.clone(), z.clone()
    first = transfer_attribute(x, z, 8, 4, seed=3)
    assert torch.equal(first, transfer_attribute(x, z, 8, 4, seed=3))
    assert torch.equal(x, x_before) and torch.equal(z, z_before)
    scale_singular_value(x, 0, 3.0)
    assert torch.equal(x, x_before)
    with torch.inference_mode():  # as the host runs nodes
        assert torch.equal(transfer_attribute(x.clone(), z.clone(), 8, 4, seed=3), first)


def test_bad_inputs_get_clear_errors():
    x = latent(11, (1, 4, 16, 24))
    with pytest.raises(ValueError, match=r"target: shape \[1, 4, 16, 16\] differs from the source's \[1, 4, 16, 24\]"):
        transfer_attribute(x, x[..., :16], 4, 4)
    with pytest.raises(ValueError, match=r"source: expected a 4-D latent \[batch, channels, height, width\]"):
        transfer_attribute(x[0], x[0], 4, 4)
    with pytest.raises(ValueError, match="k: 17 is outside 0 to 16, the number of singular vectors of a 16 x 24"):
        transfer_attribute(x, x, 17, 4)
    with pytest.raises(ValueError, match="m: 20 is outside 0 to 16"):
        transfer_attribute(x, x, 4, 20)
    with pytest.raises(ValueError, match="k, m: both are 0"):
        transfer_attribute(x, x, 0, 0)
    with pytest.raises(ValueError, match="loss weights: expected finite values of at least 0, not all 0"):
        transfer_attribute(x, x, 4, 4, AttributeWeights(0, 0, 0, 0))
    with pytest.raises(ValueError, match="index: 16 is outside 0 to 15"):
        scale_singular_value(x, 16, 2.0)
    with pytest.raises(ValueError, match="channel: 4 is outside 0 to 3"):
        scale_singular_value(x, 0, 2.0, channel=4)
    with pytest.raises(ValueError, match="source: the latent holds NaN"):
        transfer_attribute(x * float("nan"), x, 4, 4)
