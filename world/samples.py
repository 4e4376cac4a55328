"""The model card's samples: 32 faces from the committed model through the host's KSampler (ddim,
20 steps, the seeds of one batch), written to world/samples.jpg at 3x, with how close they come to
faces of the world (PSNR against the face the regressor's reading redraws to, beside the same
figure for the generator's own images) and how far the factors they show spread.

    .venv/bin/python -m world.samples
"""
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.host import Host
from world.faces import FACTORS, SIZE, dataset
from world.regressor import HELD_OUT_SEED, load, read_and_redraw

PICTURE = Path(__file__).resolve().parent / "samples.jpg"


def sample_faces(host, count: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, 32, 32, 3]: FacesWorldLoader -> EmptyLatentImage -> KSampler (ddim, 20 steps) -> VAEDecode."""
    registry = host.nodes.NODE_CLASS_MAPPINGS
    model, vae, empty = registry["FacesWorldLoader"]().load()
    latent = registry["EmptyLatentImage"]().generate(8 * SIZE, 8 * SIZE, count)[0]  # sized for an 8x VAE
    samples = host.nodes.common_ksampler(model, seed, 20, 1.0, "ddim", "normal", empty, empty, latent)[0]
    return (registry["VAEDecode"]().decode(vae, samples)[0] * 255).round().to(torch.uint8).numpy()


def main(count: int = 32, columns: int = 8, scale: int = 3):
    pixels = sample_faces(Host(Path(tempfile.mkdtemp(prefix="semdir-samples-"))), count)
    regressor = load()
    factors, psnr = read_and_redraw(regressor, pixels)
    _, psnr_of_real = read_and_redraw(regressor, dataset(count, HELD_OUT_SEED)[0])
    rows = [np.concatenate(list(pixels[i:i + columns]), 1) for i in range(0, count, columns)]
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(PICTURE, quality=92)
    print(f"wrote {PICTURE}; PSNR against the redrawn face: median {np.median(psnr):.1f} dB "
          f"(quartiles {np.percentile(psnr, 25):.1f}, {np.percentile(psnr, 75):.1f}; the generator's own faces: "
          f"median {np.median(psnr_of_real):.1f} dB); factor spread (standard deviation; uniform is 0.29) "
          + ", ".join(f"{name} {value:.2f}" for name, value in zip(FACTORS, factors.std(0))))


if __name__ == "__main__":
    main()
