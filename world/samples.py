"""The model card's samples: 32 faces from the committed model through the host (FacesWorldLoader,
KSampler: ddim, 20 steps, the seeds of one batch), written to world/samples.jpg at 3x, with how close
they come to faces of the world (world/quality.py: PSNR against the face the regressor's reading
redraws to, and how many are visibly noisy) and how far the factors they show spread.

    .venv/bin/python -m world.samples
"""
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from harness.host import Host
from world.quality import sample, sample_quality

PICTURE = Path(__file__).resolve().parent / "samples.jpg"


def main(count: int = 32, columns: int = 8, scale: int = 3):
    host = Host(Path(tempfile.mkdtemp(prefix="semdir-samples-")))
    pixels = sample(host.nodes.NODE_CLASS_MAPPINGS["FacesWorldLoader"]().load()[0], count)
    figures = sample_quality(pixels)
    rows = [np.concatenate(list(pixels[i:i + columns]), 1) for i in range(0, count, columns)]
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(PICTURE, quality=92)
    print(f"wrote {PICTURE}; PSNR against the redrawn face: median {figures['redraw_psnr_median']:.1f} dB "
          f"(quartiles {figures['redraw_psnr_quartiles'][0]:.1f}, {figures['redraw_psnr_quartiles'][1]:.1f}); "
          f"visibly noisy: {figures['noisy_samples']} of {count} (noise estimate median {figures['noise_median']:.1f}, "
          f"max {figures['noise_max']:.1f}, clean faces' max {figures['clean_noise_max']:.1f}); factor spread "
          "(standard deviation; uniform is 0.29) "
          + ", ".join(f"{n} {v:.2f}" for n, v in figures["factor_spread"].items()))


if __name__ == "__main__":
    main()
