"""h-space principal directions: the channel directions along which the middle block's output varies
most between images, at the same timestep (Asyrp's h-space, found without training).

Asyrp: Kwon, Jeong, Uh, "Diffusion Models Already Have a Semantic Latent Space" (arXiv 2210.10960).
The computation: docs/math.md, section 'h-space principal directions'."""
import torch

from .attention import fix_signs


@torch.no_grad()
def principal_directions(features: torch.Tensor, count: int):
    """Top ``count`` principal directions [count, C] and their standard deviations [count].

    ``features`` is [T, S, C]: for each of T timesteps, one C-vector per sample (e.g. h averaged
    over positions). Each timestep is centred on its own mean first, so the directions describe how
    samples differ, not how h drifts with the noise level.
    """
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"features: expected [timesteps, samples >= 2, channels], got {list(features.shape)}")
    if count < 1:
        raise ValueError(f"count: expected at least 1 direction, got {count}")
    centred = (features - features.mean(dim=1, keepdim=True)).flatten(0, 1).double()
    _, values, vh = torch.linalg.svd(centred, full_matrices=False)
    count = min(count, vh.shape[0])
    spread = values[:count] / (centred.shape[0] - features.shape[0]) ** 0.5
    return fix_signs(vh[:count]).float(), spread.float()
