"""directions.jacobian: the top right singular vectors of an operator given only as products with it and its
transpose, against a float64 SVD of the formed matrix."""
import pytest
import torch
from directions_testing import planted

from semantic_directions.directions.jacobian import EXACT_WIDTH, jacobian_directions


def planted_jacobian(outputs: int, width: int, values, seed: int = 0) -> torch.Tensor:
    """J [outputs, width] with the given leading singular values and a tail below them."""
    spectrum = torch.cat([torch.tensor(values, dtype=torch.float64),
                          torch.linspace(0.5, 0.01, width - len(values), dtype=torch.float64)])
    return planted(outputs, width, spectrum, seed)[0]


def counted(jacobian: torch.Tensor):
    """(apply, apply_t, products made) for a formed J, in float32 as the node's products are."""
    made = {"forward": 0, "reverse": 0}
    single = jacobian.float()

    def apply(vectors):
        made["forward"] += vectors.shape[1]
        return single @ vectors

    def apply_t(outputs):
        made["reverse"] += outputs.shape[1]
        return single.T @ outputs
    return apply, apply_t, made


def test_stacked_jacobians_report_gains_per_jacobian():
    """The same J stacked twice: the same directions, and gains on one J's scale (its singular values), not the
    stack's (sqrt(2) times them)."""
    jacobian = planted_jacobian(300, 96, [9.0, 6.0, 4.0], seed=2)
    apply, apply_t, _ = counted(torch.cat([jacobian, jacobian]))
    vectors, gains = jacobian_directions(apply, apply_t, 96, 3, stacked=2)
    _, values, vh = torch.linalg.svd(jacobian, full_matrices=False)
    # the iteration's rule: each gain within 1% of a singular value; gaps of 1.5x pin the vectors
    assert torch.allclose(gains.double(), values[:3], rtol=1e-2)
    assert float(torch.linalg.svdvals(vh[:3] @ vectors.double().T).min()) >= 0.99
    with pytest.raises(ValueError, match=r"^stacked: expected at least 1 Jacobian, got 0$"):
        jacobian_directions(apply, apply_t, 96, 3, stacked=0)


@pytest.mark.parametrize("weighted", [False, True])
def test_products_alone_find_the_top_singular_vectors(weighted):
    jacobian = planted_jacobian(600, 320, [8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5])
    weights = torch.rand(600, generator=torch.Generator().manual_seed(1)) if weighted else None
    apply, apply_t, made = counted(jacobian)
    vectors, gains = jacobian_directions(apply, apply_t, 320, 6, weights)
    reference = jacobian if weights is None else weights.double()[:, None] * jacobian
    _, values, vh = torch.linalg.svd(reference)
    # the stopping rule puts each gain within 1% of a singular value; a float32 operator keeps them far closer
    assert torch.allclose(gains.double(), values[:6], rtol=1e-2)
    overlaps = (vectors.double() @ vh[:6].T).abs().diagonal()
    gaps = values[:6] / values[1:7]
    assert (overlaps[gaps > 1.1] > 0.99).all()
    assert torch.allclose(vectors @ vectors.T, torch.eye(6), atol=1e-5)
    assert 0 < made["forward"] == made["reverse"] < 320 / 2  # never the 320 products of forming J


def test_a_small_mask_leaves_fewer_directions_than_asked_without_forming_j():
    """A mask over 3 output entries: the weighted J has rank 3, so 6 directions are 3 and 3 null ones (gains
    under 0.45% of the top, the floor's bound), found by products alone, not by forming J (320 products)."""
    jacobian = planted_jacobian(600, 320, [8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5])
    weights = torch.zeros(600)
    weights[[7, 300, 555]] = 1.0
    apply, apply_t, made = counted(jacobian)
    vectors, gains = jacobian_directions(apply, apply_t, 320, 6, weights)
    values = torch.linalg.svdvals(weights.double()[:, None] * jacobian)
    assert torch.allclose(gains[:3].double(), values[:3], rtol=1e-2) and (gains[3:] < 4.5e-3 * gains[0]).all()
    assert 0 < made["forward"] == made["reverse"] < 320 / 2


def test_narrow_sites_are_formed_and_decomposed_exactly():
    jacobian = planted_jacobian(200, EXACT_WIDTH, [3.0, 2.0])
    apply, apply_t, made = counted(jacobian)
    vectors, gains = jacobian_directions(apply, apply_t, EXACT_WIDTH, 2)
    values = torch.linalg.svdvals(jacobian)
    assert torch.allclose(gains.double(), values[:2], rtol=1e-5)  # a float32 SVD
    assert made == {"forward": EXACT_WIDTH, "reverse": 0}


def test_a_non_finite_derivative_is_refused_by_name():
    def apply(vectors):
        return torch.full((10, vectors.shape[1]), float("nan"))
    with pytest.raises(ValueError, match="model: its prediction's derivative holds NaN"):
        jacobian_directions(apply, lambda outputs: outputs[:8], 8, 2)
