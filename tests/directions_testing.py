"""Helpers for library tests: the library imported as a top-level package, and sample sets."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from directions.directionset import DirectionSet, SiteDirections, model_fingerprint  # noqa: E402

SITE_A = "input_blocks.7.1.transformer_blocks.0.attn1"
SITE_B = "middle_block.1.transformer_blocks.0.attn1"


def orthonormal(count: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, count, generator=generator, dtype=torch.float64))
    return q.T.contiguous().float()


def sample_set(gains: bool = True) -> DirectionSet:
    sites = {
        SITE_A: SiteDirections(orthonormal(4, 64, 1), torch.tensor([4.0, 3.0, 2.0, 1.0]) if gains else None),
        SITE_B: SiteDirections(orthonormal(3, 128, 2), torch.tensor([9.0, 5.0, 0.5]) if gains else None),
        "h_space": SiteDirections(orthonormal(2, 128, 3)),
    }
    widths = {SITE_A: 64, SITE_B: 128, "h_space": 128}
    return DirectionSet(sites=sites, method="test", params={"count": 4, "note": "ünïcode"},
                        model={"family": "SD15", "fingerprint": model_fingerprint("SD15", widths)})
