"""DIRECTIONS: the data that flows between discovery, files and application.

A set holds, for one or more sites of one model, k orthonormal-or-at-least-unit vectors of the
site's width with their gains where the method gives them. A site is named by where it lives:
the input of a UNet self-attention layer (its module path under the UNet, ending in ``.attn1``),
the image-token attention input of a transformer (DiT) block (a path ending in ``.img_attn``,
``.attn`` or ``.x_block.attn2``), or h-space (the middle block's output).
"""
import hashlib
import json
import re
from dataclasses import dataclass, field

import torch

from . import __version__

HSPACE = "h_space"
ATTN1 = "attn1"
DIT = "dit_attention"
_ATTN1_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\.attn1$")
_DIT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\.(img_attn|attn|x_block\.attn2)$")
UNIT_NORM_TOLERANCE = 1e-3


class DirectionError(ValueError):
    """A direction set that breaks the data model; the message is one line naming the problem."""


def site_kind(name: str) -> str:
    """Which kind of site a name denotes: ``attn1``, ``dit_attention`` or ``h_space``."""
    if name == HSPACE:
        return name
    if isinstance(name, str) and _ATTN1_PATH.match(name):
        return ATTN1
    if isinstance(name, str) and _DIT_PATH.match(name):
        return DIT
    raise DirectionError(
        f"site {name!r} is not a known site: expected a self-attention module path ending in "
        f"'.attn1' (e.g. 'input_blocks.7.1.transformer_blocks.0.attn1'), a transformer block's attention "
        f"ending in '.img_attn', '.attn' or '.x_block.attn2' (e.g. 'double_blocks.3.img_attn') or "
        f"'{HSPACE}'")


def model_fingerprint(family: str, widths: dict) -> str:
    """A short stable hash of a model family and the widths of its sites, to match sets to models."""
    text = json.dumps({"family": family, "widths": widths}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SiteDirections:
    """k unit vectors (rows of ``vectors``, shape [k, d], float32) and optional gains [k]."""
    vectors: torch.Tensor
    gains: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.shape[1]


@dataclass(frozen=True)
class DirectionSet:
    """Directions at one or more sites of one model, with where they came from.

    ``model`` is ``{"family": ..., "fingerprint": ...}`` (see :func:`model_fingerprint`);
    ``params`` holds the method's parameters as JSON-compatible values.
    """
    sites: dict
    method: str
    model: dict
    params: dict = field(default_factory=dict)
    pack_version: str = __version__

    def __post_init__(self):
        validate(self)

    @property
    def count(self) -> int:
        """Directions per site (the smallest count when sites differ)."""
        return min(s.count for s in self.sites.values())


def validate(dset: DirectionSet) -> None:
    """Raise DirectionError, naming the first problem, unless the set obeys the data model."""
    if not isinstance(dset.sites, dict) or not dset.sites:
        raise DirectionError("a direction set needs at least one site")
    for name, site in dset.sites.items():
        site_kind(name)
        _validate_site(name, site)
    if not isinstance(dset.method, str) or not dset.method:
        raise DirectionError("method must be a non-empty string")
    if not isinstance(dset.model, dict) or not all(
            isinstance(dset.model.get(key), str) for key in ("family", "fingerprint")):
        raise DirectionError("model must be a dict with string 'family' and 'fingerprint'")
    if not isinstance(dset.params, dict):
        raise DirectionError("params must be a dict")
    try:
        json.dumps(dset.params, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise DirectionError(f"params must be JSON values with finite numbers ({err})") from None
    if dset.params.get("alpha_unit", "site") not in ("site", "pair"):
        raise DirectionError(f"params: alpha_unit must be 'site' or 'pair', got {dset.params['alpha_unit']!r}")
    if dset.params.get("alpha_unit") == "pair" and any(site.gains is None for site in dset.sites.values()):
        raise DirectionError("a pair's directions need their gains (the pair's strength at each site)")
    if not isinstance(dset.pack_version, str):
        raise DirectionError("pack_version must be a string")


def _validate_site(name: str, site: SiteDirections) -> None:
    vectors, gains = site.vectors, site.gains
    if not isinstance(vectors, torch.Tensor) or vectors.dtype != torch.float32 or vectors.ndim != 2:
        raise DirectionError(f"site {name}: vectors must be a float32 tensor of shape [count, width]")
    count, width = vectors.shape
    if count < 1 or width < 1:
        raise DirectionError(f"site {name}: vectors have an empty shape {list(vectors.shape)}")
    if not torch.isfinite(vectors).all():
        raise DirectionError(f"site {name}: vectors contain NaN or infinite values")
    norms = vectors.double().norm(dim=1)
    worst = (norms - 1).abs().max().item()
    if worst > UNIT_NORM_TOLERANCE:
        raise DirectionError(f"site {name}: vectors must have unit norm (one is off by {worst:.3g})")
    if gains is not None:
        if not isinstance(gains, torch.Tensor) or gains.dtype != torch.float32 or gains.shape != (count,):
            raise DirectionError(f"site {name}: gains must be a float32 tensor of shape [{count}]")
        if not torch.isfinite(gains).all():
            raise DirectionError(f"site {name}: gains contain NaN or infinite values")



def describe(dset: DirectionSet) -> str:
    """A short human summary: method, model family and each site's count and width."""
    named = f" '{dset.params['source']}' -> '{dset.params['target']}'" if "target" in dset.params else ""
    if dset.params.get("projected_out"):
        named += " without " + ", ".join(f"'{name}'" for name in dset.params["projected_out"])
    lines = [f"{dset.method} directions{named} for {dset.model['family']} ({len(dset.sites)} site"
             f"{'s' if len(dset.sites) != 1 else ''}, pack {dset.pack_version})"]
    lines += [f"{name}: {site.count} x {site.width}" for name, site in dset.sites.items()]
    return "\n".join(lines)
