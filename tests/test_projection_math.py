"""Library layer: projecting directions out of others (conditional directions), against float64 references."""
import pytest
import torch
from directions_testing import SITE_A, SITE_B, assert_float32_close, orthonormal, sample_set

from semantic_directions.directions.directionset import DirectionError, DirectionSet, SiteDirections, describe
from semantic_directions.directions.fileformat import load_directions, save_directions
from semantic_directions.directions.projection import project_out, project_out_set


def unit_rows(count, width, seed):
    rows = torch.randn(count, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(rows, dim=1).float()


def least_squares_projection(rows: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """Each row minus its least-squares fit by the rows of ``remove``, in float64: an independent reference."""
    rows, remove = rows.double(), remove.double()
    fit = torch.linalg.lstsq(remove.T, rows.T).solution
    return rows - (remove.T @ fit).T


def test_one_removed_direction_is_interfacegans_conditional_direction():
    n, m = unit_rows(1, 64, 1), unit_rows(1, 64, 2)
    found, kept = project_out(n, m)
    expected = n.double() - (n.double() @ m.double().T) * m.double()
    assert_float32_close(found, expected / expected.norm(), scale=1.0)
    assert kept.item() == pytest.approx(float(expected.norm()), rel=1e-6)
    assert abs(float(found.double() @ m.double().T)) < 1e-6


def test_several_removed_directions_dependent_ones_counted_once():
    rows, remove = unit_rows(3, 96, 3), unit_rows(4, 96, 4)
    dependent = torch.cat([remove, remove[:1], (remove[1] - 2 * remove[2])[None]])  # 6 rows spanning 4 dimensions
    found, kept = project_out(rows, dependent)
    reference = least_squares_projection(rows, remove)
    assert_float32_close(found, reference / reference.norm(dim=1, keepdim=True), scale=1.0)
    assert_float32_close(kept, reference.norm(dim=1), scale=1.0)
    assert (found.double() @ remove.double().T).abs().max() < 1e-6
    assert torch.allclose(found.double().norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-6)


def pair_set(vectors: torch.Tensor, gains: torch.Tensor, model: dict, target: str) -> DirectionSet:
    return DirectionSet(sites={SITE_A: SiteDirections(vectors, gains)}, method="pair-prompts", model=model,
                        params={"source": "neutral", "target": target, "alpha_unit": "pair"})


def test_a_pairs_strength_shrinks_to_its_change_less_the_removed_part(tmp_path):
    """Apply Direction shifts a pair's site by alpha * gain * vector: after projection that is exactly the
    projected mean difference, P (gain n)."""
    model = sample_set().model
    smile = pair_set(unit_rows(1, 64, 5), torch.tensor([0.8]), model, "smiling")
    background = pair_set(unit_rows(1, 64, 6), torch.tensor([1.3]), model, "bright background")
    projected, kept = project_out_set(smile, background)
    site = projected.sites[SITE_A]
    reference = least_squares_projection(0.8 * smile.sites[SITE_A].vectors, background.sites[SITE_A].vectors)
    assert_float32_close(site.gains[:, None] * site.vectors, reference, scale=0.8)
    assert kept[SITE_A].item() == pytest.approx(site.gains.item() / 0.8, rel=1e-6)
    assert projected.params["projected_out"] == ["bright background"]
    assert describe(projected).startswith("pair-prompts directions 'neutral' -> 'smiling' without 'bright background'")
    loaded = load_directions(save_directions(projected, str(tmp_path / "smiling.safetensors")))
    assert loaded.params == projected.params and torch.equal(loaded.sites[SITE_A].gains, site.gains)


def test_other_sets_drop_their_gains_where_projected_and_keep_unshared_sites():
    first = sample_set()
    remove = DirectionSet(sites={SITE_B: SiteDirections(orthonormal(2, 128, 7))}, method="other", model=first.model)
    projected, kept = project_out_set(first, remove)
    assert list(kept) == [SITE_B] and projected.sites[SITE_B].gains is None
    assert projected.sites[SITE_A] is first.sites[SITE_A] and projected.sites["h_space"] is first.sites["h_space"]
    again, _ = project_out_set(projected, remove)  # chained: nothing left to remove, and both are recorded
    assert_float32_close(again.sites[SITE_B].vectors, projected.sites[SITE_B].vectors, scale=1.0)
    assert again.params["projected_out"] == ["other", "other"] and again.params["count"] == 4


def test_refusals_name_the_input():
    dset = sample_set()
    other_model = DirectionSet(sites=dset.sites, method="x", model={"family": "SDXL", "fingerprint": "0" * 16})
    with pytest.raises(DirectionError, match=r"^remove: made for SDXL .* but directions are for SD15"):
        project_out_set(dset, other_model)
    elsewhere = DirectionSet(sites={"input_blocks.4.1.transformer_blocks.0.attn1": SiteDirections(
        orthonormal(1, 64, 9))}, method="x", model=dset.model)
    with pytest.raises(DirectionError, match=r"^remove: has none of the directions' sites"):
        project_out_set(dset, elsewhere)
    same = DirectionSet(sites={SITE_A: SiteDirections(dset.sites[SITE_A].vectors[1:3])}, method="x", model=dset.model)
    with pytest.raises(DirectionError, match=rf"^directions: #1, #2 at {SITE_A} lie within remove's directions"):
        project_out_set(dset, same)
    one = DirectionSet(sites={SITE_A: SiteDirections(dset.sites[SITE_A].vectors[1:2])}, method="x", model=dset.model)
    with pytest.raises(DirectionError, match=rf"^directions: #1 at {SITE_A} lies within remove's directions there "
                                             r"\(keeping .* of its length\): nothing would remain$"):
        project_out_set(dset, one)
    narrow = DirectionSet(sites={SITE_A: SiteDirections(orthonormal(1, 32, 9))}, method="x", model=dset.model)
    with pytest.raises(DirectionError, match=rf"^remove: {SITE_A} is 32 wide, the directions there 64"):
        project_out_set(dset, narrow)
