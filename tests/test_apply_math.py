"""Library layer: the edit's arithmetic and the Asyrp step on plain tensors; and the host's batch layout."""
import pytest
import torch
from directions_testing import assert_float32_close, randn

from semantic_directions.directions.apply import DirectionEdit, Rows, mask_to_tokens, rms_token_norm, shift_feature_map
from semantic_directions.directions.asyrp import asyrp_step
from semantic_directions.nodes.common import parse_numbers
from semantic_directions.nodes.host import COND, UNCOND, UNEDITED, batch_rows

SITE = "input_blocks.1.1.transformer_blocks.0.attn1"


def rows(count, images=None, edited=None, sigma=5.0):
    """Rows of a batch where row r is image r % images, all edited, all at ``sigma``."""
    images = images or count
    edited = torch.ones(count, dtype=torch.bool) if edited is None else torch.tensor(edited)
    return Rows(image=torch.arange(count) % images, edited=edited, sigma=torch.full((count,), float(sigma)),
                images=images)


def unit(width, seed=0):
    return torch.nn.functional.normalize(torch.randn(width, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_parse_numbers():
    assert parse_numbers("-2, -1,0 ,1,2.5", "alpha_list") == [-2.0, -1.0, 0.0, 1.0, 2.5]
    with pytest.raises(ValueError, match="alpha_list: 'x' is not a number; expected comma-separated"):
        parse_numbers("1,x", "alpha_list")
    with pytest.raises(ValueError, match="factor_list: inf is not finite"):
        parse_numbers("1,inf", "factor_list")


def test_shift_has_the_documented_length_and_direction():
    tokens = randn(2, 16, 8)
    direction = unit(8)
    edit = DirectionEdit({SITE: direction}, [0.25], 10.0, 0.0)
    shifted = edit.shift(SITE, tokens, (4, 4), rows(2))
    delta = shifted - tokens
    expected = 0.25 * rms_token_norm(tokens)[:, None, None] * direction
    # (tokens + shift) - tokens: a few float32 roundings at the tokens' scale, not the shift's
    assert_float32_close(delta, expected.expand_as(delta), ulps=8, scale=float(shifted.abs().max()))


def test_nothing_changes_outside_range_sites_unedited_rows_or_at_zero():
    tokens = randn(4, 16, 8)
    edit = DirectionEdit({SITE: unit(8)}, [1.0], 5.0, 1.0)
    assert edit.shift("middle_block.1.transformer_blocks.0.attn1", tokens, (4, 4), rows(4, sigma=3.0)) is tokens
    assert edit.shift(SITE, tokens, (4, 4), rows(4, sigma=6.0)) is tokens
    assert edit.shift(SITE, tokens, (4, 4), rows(4, edited=[False] * 4, sigma=3.0)) is tokens
    zero = DirectionEdit({SITE: unit(8)}, [0.0], 5.0, 1.0)
    assert zero.shift(SITE, tokens, (4, 4), rows(4, sigma=3.0)) is tokens
    shifted = edit.shift(SITE, tokens, (4, 4), rows(4, images=2, edited=[False, False, True, True], sigma=3.0))
    assert torch.equal(shifted[:2], tokens[:2]) and not torch.equal(shifted[2:], tokens[2:])


def test_the_hosts_batch_layout():
    """cond/uncond chunks in cond_or_uncond order, image i at row i of each chunk; the Asyrp sampler's
    copies (each chunk's second half) and passes not chosen stay unedited; a sweep's alpha i goes to image i."""
    options = {"cond_or_uncond": [UNCOND, COND], "sigmas": torch.tensor([2.0, 2.0, 2.0])}
    layout = batch_rows(options, 6, passes=(COND,))
    assert layout.image.tolist() == [0, 1, 2] * 2 and layout.images == 3
    assert layout.edited.tolist() == [False] * 3 + [True] * 3 and layout.sigma.tolist() == [2.0] * 6
    copies = batch_rows({**options, UNEDITED: "copies"}, 12, passes=(COND, UNCOND))
    assert copies.images == 3 and copies.image.tolist() == [0, 1, 2] * 4
    assert copies.edited.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    sweep = DirectionEdit({SITE: unit(8)}, [0.0, 1.0, -2.0], 10.0, 0.0)
    assert sweep.strengths(copies).tolist() == [0.0, 1.0, -2.0, 0, 0, 0] * 2
    with pytest.raises(ValueError, match="3 strengths or masks for a batch of 2 images"):
        sweep.strengths(rows(4, images=2))


def test_mask_leaves_tokens_outside_exactly_unchanged():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :28] = 1.0  # token columns 0-2 of an 8x8 grid inside, 3 half, 4+ wholly outside
    weights = mask_to_tokens(mask, (8, 8)).reshape(8, 8)
    assert (weights[:, :3] == 1).all() and (weights[:, 3] > 0).all() and (weights[:, 4:] == 0).all()
    tokens = randn(2, 64, 8)
    edit = DirectionEdit({SITE: unit(8)}, [1.0], 10.0, 0.0, mask=mask)
    shifted = edit.shift(SITE, tokens, (8, 8), rows(2)).reshape(2, 8, 8, 8)
    assert torch.equal(shifted[:, :, 4:], tokens.reshape(2, 8, 8, 8)[:, :, 4:])
    assert not torch.equal(shifted[:, :, :3], tokens.reshape(2, 8, 8, 8)[:, :, :3])
    two_masks = DirectionEdit({SITE: unit(8)}, [1.0], 10.0, 0.0, mask=mask.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="1 strengths or masks for a batch of 3 images"):
        two_masks.shift(SITE, torch.randn(3, 64, 8), (8, 8), rows(3))


def test_feature_map_edit_is_the_token_edit():
    h = randn(2, 8, 4, 4)
    edit = DirectionEdit({"h_space": unit(8)}, [0.5], 10.0, 0.0)
    shifted = shift_feature_map(edit, "h_space", h, rows(2))
    tokens = h.flatten(2).transpose(1, 2)
    expected = edit.shift("h_space", tokens, (4, 4), rows(2)).transpose(1, 2).reshape(2, 8, 4, 4)
    assert_float32_close(shifted, expected)


def test_asyrp_step_formula_and_its_plain_ddim_limit():
    inputs = randn(3, 4, 8, 8)
    x, x0_edit, x0_orig = inputs.unbind(0)
    scale = float(inputs.abs().max())  # both sides: a few float32 sums and products at the inputs' scale
    sigma, sigma_next = torch.tensor(3.0), torch.tensor(1.5)
    stepped = asyrp_step(x, sigma, sigma_next, x0_edit, x0_orig)
    assert_float32_close(stepped, x0_edit + sigma_next * (x - x0_orig) / sigma, ulps=16, scale=scale)
    euler = x + (x - x0_orig) / sigma * (sigma_next - sigma)  # the host's ddim (Euler) update
    assert torch.equal(asyrp_step(x, sigma, sigma_next, x0_orig, x0_orig), euler)
    down = torch.tensor(1.0)  # a step that stops early, leaving room for noise: x0 + down * eps_original
    assert_float32_close(asyrp_step(x, sigma, down, x0_edit, x0_orig), x0_edit + down * (x - x0_orig) / sigma,
                         ulps=16, scale=scale)


def test_one_scale_per_image_across_cond_and_uncond():
    """Guidance mixes the passes; a shared per-image scale keeps it from distorting the edit."""
    tokens = randn(2, 16, 8)
    tokens[1] *= 3  # the uncond pass's tokens are larger
    edit = DirectionEdit({SITE: unit(8)}, [0.5], 10.0, 0.0)
    delta = edit.shift(SITE, tokens, (4, 4), rows(2, images=1)) - tokens
    scale = float(tokens.abs().max())  # each delta is (tokens + shift) - tokens: it rounds at the tokens' scale
    assert_float32_close(delta[0], delta[1], ulps=8, scale=scale)
    assert_float32_close(delta[0, 0].norm(), 0.5 * rms_token_norm(tokens).mean(), ulps=8, scale=scale)


def test_asyrp_step_for_flow_models():
    """x = (1 - sigma) x0 + sigma eps: x_next = (1 - sigma_next) x0_edited + sigma_next eps_original."""
    inputs = randn(3, 4, 8, 8)
    x, x0_edit, x0_orig = inputs.unbind(0)
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.5)
    eps = (x - (1 - sigma) * x0_orig) / sigma
    stepped = asyrp_step(x, sigma, sigma_next, x0_edit, x0_orig, flow=True)
    assert_float32_close(stepped, (1 - sigma_next) * x0_edit + sigma_next * eps, ulps=16,
                         scale=float(inputs.abs().max()))
