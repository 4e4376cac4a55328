"""The measuring instrument of the faces world: a small CNN that reads the seven factors back from
any 32 x 32 image, trained on the generator's labels. Deterministic for a seed.

    .venv/bin/python -m world.regressor  # train, report held-out accuracy, write world/regressor.safetensors
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from world.faces import FACTORS, dataset, render

WEIGHTS = Path(__file__).resolve().parent / "regressor.safetensors"
TRAIN_SEED, HELD_OUT_SEED = 101, 202  # neither is the diffusion model's training seed


class FactorRegressor(torch.nn.Module):
    """[B, 3, 32, 32] images in [-1, 1] -> [B, 7] factors in [0, 1]."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 96, 128):
            layers += [torch.nn.Conv2d(width, out, 3, stride=1 if width == 3 else 2, padding=1), torch.nn.SiLU()]
            width = out
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(128 * 4 * 4, 128), torch.nn.SiLU(),
                                        torch.nn.Linear(128, len(FACTORS)), torch.nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] -> float [B, 3, 32, 32] in [-1, 1], the identity VAE's scale."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train(images: int = 20000, epochs: int = 8, seed: int = 0, log=print) -> FactorRegressor:
    torch.manual_seed(seed)
    pixels, factors = dataset(images, TRAIN_SEED)
    x, y = to_input(pixels), torch.from_numpy(factors).float()
    model = FactorRegressor()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * (images // 128))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(images, generator=generator)
        for start in range(0, images - 127, 128):
            batch = order[start:start + 128]
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"epoch {epoch + 1}: loss {loss.item():.5f}", flush=True)
    return model.eval()


@torch.no_grad()
def held_out_error(model: FactorRegressor, images: int = 2000) -> dict:
    """Mean absolute error per factor (factor units, each factor spans 0 to 1) on unseen images."""
    pixels, factors = dataset(images, HELD_OUT_SEED)
    error = (model(to_input(pixels)) - torch.from_numpy(factors).float()).abs().mean(0)
    return {name: round(float(e), 4) for name, e in zip(FACTORS, error)}


def load() -> FactorRegressor:
    model = FactorRegressor()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


@torch.no_grad()
def read_and_redraw(model: FactorRegressor, pixels: np.ndarray):
    """(factors [B, 7], PSNR [B]): what the regressor reads from uint8 images [B, 32, 32, 3], and how close
    each image is to the face the generator draws from those factors (a face of this world scores high)."""
    factors = model(to_input(pixels)).numpy()
    return factors, redraw_psnr(pixels, factors)


def redraw_psnr(pixels: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """PSNR [B] (dB) of uint8 images [B, H, W, 3] against the faces the generator draws from ``factors`` [B, 7]."""
    redrawn = np.stack([render(row, pixels.shape[1]) for row in factors]).astype(float)
    error = ((pixels.astype(float) - redrawn) ** 2).mean((1, 2, 3))
    return 10 * np.log10(255 ** 2 / np.maximum(error, 1e-10))


def main():
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = train()
    errors = held_out_error(model)
    print("held-out mean absolute error per factor:", errors, f"({time.perf_counter() - start:.0f} s)")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS),
              metadata={"held_out_mae": json.dumps(errors), "factors": json.dumps(FACTORS)})
    print("wrote", WEIGHTS)


if __name__ == "__main__":
    main()
