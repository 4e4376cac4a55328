"""Applying a direction: add it to a site's tokens, scaled, masked, per batch row and timestep range.

Strength convention: ``alpha`` is the length of the shift in units of the site's RMS token norm,
measured as it samples: sqrt of the mean over tokens of |token|^2, averaged over every row of the
model batch that belongs to the image (with guidance, its cond and uncond rows together), so
guidance does not distort it.
So alpha = 0.1 moves every token by a tenth of a typical token, whatever the layer's width or
the site (an attention layer's input, or h-space), and one slider range works everywhere.
The exact rule: docs/math.md, section 'Strength convention'.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange


@dataclass(frozen=True)
class Rows:
    """How the rows of one model batch map to the images being sampled, as the caller's host lays them out.

    ``image[r]`` is the latent-batch image row r belongs to, ``edited[r]`` whether row r may carry the
    edit (a pass the edit applies to, not an unedited reference copy), ``sigma[r]`` its noise level,
    and ``images`` the number of images; long, bool and float tensors of one length, on the CPU.
    """
    image: torch.Tensor
    edited: torch.Tensor
    sigma: torch.Tensor
    images: int


def rms_token_norm(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B]: the root mean square token norm of each batch element."""
    return tokens.float().pow(2).sum(dim=-1).mean(dim=-1).sqrt()


def image_scales(tokens: torch.Tensor, rows: "Rows") -> torch.Tensor:
    """[B, N, C] -> [B]: each row's scale, the mean RMS token norm over all rows of its image (cond, uncond,
    copies), so classifier-free guidance does not amplify a difference between the passes' scales."""
    image = rows.image.to(tokens.device)
    per_image = torch.zeros(rows.images, device=tokens.device).index_add_(0, image, rms_token_norm(tokens))
    return (per_image / torch.bincount(image, minlength=rows.images))[image]


def mask_to_tokens(mask: torch.Tensor, grid: tuple) -> torch.Tensor:
    """[M, H, W] mask -> [M, h * w] token weights by area averaging: a token wholly outside is exactly 0."""
    resized = F.interpolate(mask[:, None].float(), size=grid, mode="area")
    return rearrange(resized, "m 1 h w -> m (h w)")


class DirectionEdit:
    """One edit: a unit direction per site, a strength per image, a sigma range and a mask.

    ``alphas`` holds one strength, or one per image of the batch (a sweep). ``mask`` is [M, H, W]
    with M = 1 or one per image. Immutable once built, so host clones may share it.
    """

    def __init__(self, directions: dict, alphas: list, sigma_start: float, sigma_end: float,
                 mask: torch.Tensor | None = None):
        self.directions, self.alphas = directions, [float(a) for a in alphas]
        self.sigma_start, self.sigma_end, self.mask = sigma_start, sigma_end, mask
        self._moved = {}

    def __deepcopy__(self, memo):
        return self

    def active_at(self, sigma: float) -> bool:
        """Inside the range (sigma_end <= sigma <= sigma_start) with some non-zero strength."""
        return self.sigma_end <= float(sigma) <= self.sigma_start and any(self.alphas)

    def fits(self, images: int) -> bool:
        """Whether the strengths and masks fit a batch of ``images`` images (one, or one per image)."""
        masks = 1 if self.mask is None else self.mask.shape[0]
        return len(self.alphas) in (1, images) and masks in (1, images)

    def strengths(self, rows: Rows) -> torch.Tensor:
        """Each row's strength: its image's alpha where the row is edited and inside the range, else 0."""
        if not self.fits(rows.images):
            raise ValueError(f"{len(self.alphas)} strengths or masks for a batch of {rows.images} images; "
                             f"expected one, or one per image")
        alphas = torch.tensor(self.alphas)[rows.image % len(self.alphas)]
        in_range = (rows.sigma <= self.sigma_start) & (rows.sigma >= self.sigma_end)
        return torch.where(rows.edited & in_range, alphas, torch.zeros(()))

    def shift(self, site: str, tokens: torch.Tensor, grid: tuple, rows: Rows) -> torch.Tensor:
        """``tokens`` [B, N, C] with this edit added at ``site``, or the same object if nothing changes."""
        coefficients = self.coefficients(site, tokens, grid, rows)
        if coefficients is None:
            return tokens
        return tokens + coefficients[..., None] * self.vector(site, tokens)

    def coefficients(self, site: str, tokens: torch.Tensor, grid: tuple, rows: Rows) -> torch.Tensor | None:
        """[B, N]: how far each token moves along the site's direction (strength x image scale x mask weight),
        or None where nothing moves. A linear map W of the tokens so moves by coefficients x (W direction)."""
        if site not in self.directions:
            return None
        strengths = self.strengths(rows)
        if not strengths.any():
            return None
        image_on = rows.image.to(tokens.device)
        scale = (strengths.to(tokens.device) * image_scales(tokens, rows)).to(tokens.dtype)[:, None]
        if self.mask is None:
            return scale.expand(-1, tokens.shape[1])
        weights = self._mask_on(grid, tokens)
        return scale * weights[image_on % weights.shape[0]]

    def vector(self, site, like):
        """The site's shift at alpha 1 per unit scale, on ``like``'s device and dtype."""
        key = (site, like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = self.directions[site].to(like.device, like.dtype)
        return self._moved[key]

    def _mask_on(self, grid, like):
        key = ("mask", tuple(grid), like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = mask_to_tokens(self.mask, grid).to(like.device, like.dtype)
        return self._moved[key]


def shift_feature_map(edit: DirectionEdit, site: str, h: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The same edit on a [B, C, H, W] feature map (h-space): its H x W positions are the tokens."""
    tokens = rearrange(h, "b c h w -> b (h w) c")
    shifted = edit.shift(site, tokens, h.shape[-2:], rows)
    return h if shifted is tokens else rearrange(shifted, "b (h w) c -> b c h w", h=h.shape[-2])
