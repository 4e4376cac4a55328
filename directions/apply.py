"""Applying a direction: add it to a site's tokens, scaled, masked, per batch row and timestep range.

Strength convention: ``alpha`` is the length of the shift in units of the site's RMS token norm,
measured on each image's own tokens at that moment (sqrt of the mean over tokens of |token|^2).
One scale per image (the mean over its cond and uncond rows), so guidance does not distort it.
So alpha = 0.1 moves every token by a tenth of a typical token, whatever the layer's width or
the site (an attention layer's input, or h-space), and one slider range works everywhere.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange

PASSES = {"both": (0, 1), "cond": (0,), "uncond": (1,)}  # the host's cond_or_uncond codes: 0 cond, 1 uncond


def parse_numbers(text: str, name: str = "alpha_list") -> list:
    """'-2, -1, 0, 1, 2' -> [-2.0, -1.0, 0.0, 1.0, 2.0]; every value must be a finite number.

    ``name`` is the node input the text came from, for the error message.
    """
    values = []
    for part in text.replace(";", ",").split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{name}: {part.strip()!r} is not a number; expected comma-separated "
                             f"numbers like -2,-1,0,1,2") from None
        if not math.isfinite(value):
            raise ValueError(f"{name}: {part.strip()} is not finite")
        values.append(value)
    return values


def rms_token_norm(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B]: the root mean square token norm of each batch element."""
    return tokens.float().pow(2).sum(dim=-1).mean(dim=-1).sqrt()


def mask_to_tokens(mask: torch.Tensor, grid: tuple) -> torch.Tensor:
    """[M, H, W] mask -> [M, h * w] token weights by area averaging: a token wholly outside is exactly 0."""
    resized = F.interpolate(mask[:, None].float(), size=grid, mode="area")
    return rearrange(resized, "m 1 h w -> m (h w)")


class DirectionEdit:
    """One edit: a unit direction per site, a strength per image, a sigma range, passes and a mask.

    ``alphas`` holds one strength, or one per image of the latent batch (a sweep). ``mask`` is
    [M, H, W] with M = 1 or one per image. Immutable once built, so host clones may share it.
    """

    def __init__(self, directions: dict, alphas: list, sigma_start: float, sigma_end: float,
                 passes=(0, 1), mask: torch.Tensor | None = None):
        self.directions, self.alphas = directions, [float(a) for a in alphas]
        self.sigma_start, self.sigma_end, self.passes, self.mask = sigma_start, sigma_end, tuple(passes), mask
        self._moved, self._last_rows = {}, (None, None)

    def __deepcopy__(self, memo):
        return self

    def active_at(self, sigma: float) -> bool:
        """Inside the range (sigma_end <= sigma <= sigma_start) with some non-zero strength."""
        return self.sigma_end <= float(sigma) <= self.sigma_start and any(self.alphas)

    def row_strengths(self, rows: int, cond_or_uncond: list, sigmas: torch.Tensor,
                      unedited_copies: bool = False):
        """Cached per UNet call: every layer of one call passes the same ``sigmas`` object, so the
        host-to-CPU read of sigma happens once per call, not once per layer."""
        key = (sigmas, rows, tuple(cond_or_uncond), unedited_copies)
        cached_key, cached = self._last_rows
        if cached_key is None or cached_key[0] is not sigmas or cached_key[1:] != key[1:]:
            cached = self._row_strengths(rows, cond_or_uncond, sigmas, unedited_copies)
            self._last_rows = (key, cached)
        return cached

    def _row_strengths(self, rows: int, cond_or_uncond: list, sigmas: torch.Tensor, unedited_copies: bool):
        """Per-row strength [rows], latent-batch index [rows] and image count for a UNet batch.

        The host stacks equal chunks in ``cond_or_uncond`` order; within a chunk, row i is image i.
        With ``unedited_copies`` (the Asyrp sampler) each chunk holds the images twice, the second
        copy evaluated without the edit.
        """
        chunk = rows // len(cond_or_uncond)
        images = chunk // 2 if unedited_copies else chunk
        if len(self.alphas) not in (1, images):
            raise ValueError(f"alpha_list: {len(self.alphas)} values for a latent batch of {images} images; "
                             f"give one value per image")
        within = torch.arange(rows) % chunk
        image = within % images
        alphas = torch.tensor(self.alphas)[image % len(self.alphas)]
        passes = torch.tensor([code in self.passes for code in cond_or_uncond]).repeat_interleave(chunk)
        row_sigmas = sigmas.flatten().float().cpu()[torch.arange(rows) % sigmas.numel()]
        in_range = (row_sigmas <= self.sigma_start) & (row_sigmas >= self.sigma_end)
        edited = passes & in_range & ~(unedited_copies & (within >= images))
        return torch.where(edited, alphas, torch.zeros(())), image, images

    def shift(self, site: str, tokens: torch.Tensor, grid: tuple, cond_or_uncond: list,
              sigmas: torch.Tensor, unedited_copies: bool = False):
        """``tokens`` [B, N, C] with this edit added at ``site``, or the same object if nothing changes."""
        if site not in self.directions:
            return tokens
        strengths, image, images = self.row_strengths(tokens.shape[0], cond_or_uncond, sigmas, unedited_copies)
        if not strengths.any():
            return tokens
        direction = self._on(site, tokens)
        # One scale per image: the mean RMS token norm over all its rows (cond, uncond, copies), so
        # classifier-free guidance does not amplify a difference between the passes' scales.
        norms = rms_token_norm(tokens)
        image_on = image.to(tokens.device)
        per_image = torch.zeros(images, device=tokens.device).index_add_(0, image_on, norms)
        per_image = per_image / torch.bincount(image_on, minlength=images)
        scale = (strengths.to(tokens.device) * per_image[image_on]).to(tokens.dtype)[:, None, None]
        shift = scale * direction
        if self.mask is not None:
            weights = self._mask_on(grid, tokens)
            if weights.shape[0] not in (1, images):
                raise ValueError(f"mask: {weights.shape[0]} masks for a latent batch of {images} images; "
                                 f"give one mask or one per image")
            shift = shift * weights[image_on % weights.shape[0], :, None]
        return tokens + shift

    def _on(self, site, like):
        key = (site, like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = self.directions[site].to(like.device, like.dtype)
        return self._moved[key]

    def _mask_on(self, grid, like):
        key = ("mask", tuple(grid), like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = mask_to_tokens(self.mask, grid).to(like.device, like.dtype)
        return self._moved[key]


def shift_feature_map(edit: DirectionEdit, site: str, h: torch.Tensor, cond_or_uncond: list,
                      sigmas: torch.Tensor, unedited_copies: bool = False) -> torch.Tensor:
    """The same edit on a [B, C, H, W] feature map (h-space): its H x W positions are the tokens."""
    tokens = rearrange(h, "b c h w -> b (h w) c")
    shifted = edit.shift(site, tokens, h.shape[-2:], cond_or_uncond, sigmas, unedited_copies)
    return h if shifted is tokens else rearrange(shifted, "b (h w) c -> b c h w", h=h.shape[-2])
