"""How good the faces world's model is, against its limit:

- one-step x0 PSNR: held-out generator faces noised to sigma, denoised in one model call (beside the same on
  as many of the faces it trained on), against the
  oracle (world/oracle.py, the best any denoiser can do) on the same noise; the oracle's two
  independent runs' agreement says whether its own figure has converged;
- samples (KSampler, ddim, 20 steps, cfg 1): PSNR against the face the regressor's reading redraws
  to, and a noise measure: Immerkaer's estimate of the standard deviation of white noise in an image
  (8-bit units) from its Laplacian residual, which the generator's clean faces keep low.

    .venv/bin/python -m world.quality [--weights FILE] [--faces 16] [--samples 32] [--json]

FILE is exported weights or a training checkpoint (.cache/world-train/checkpoint.safetensors, its EMA).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .faces import FACTORS, SIZE, dataset
from .oracle import posterior_means, psnr
from .regressor import HELD_OUT_SEED, read_and_redraw
from .regressor import load as load_regressor

SIGMAS = (1.0, 4.0)
NOISE_SEED = 7
NOISY_FACTOR = 2.0  # a sample is visibly noisy above twice the noisiest clean face's estimate


def generator_faces(count: int, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """[count, 32, 32, 3] float64 in [-1, 1]: the world's faces for ``seed``; the default seed's are held out from
    the model and the regressor, seed 0's are the first the model trained on (world/train.py's default)."""
    pixels, _ = dataset(count, seed)
    return pixels.astype(np.float64) / 127.5 - 1


def noised(faces: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng([NOISE_SEED, int(sigma * 1000)]).standard_normal(faces.shape)
    return faces + sigma * noise


@torch.no_grad()
def model_x0_psnr(patcher, faces: np.ndarray, sigma: float) -> float:
    """Mean PSNR (dB) of one model call's x0 prediction at ``sigma`` over ``faces``."""
    from .model import empty_context
    x = torch.from_numpy(noised(faces, sigma)).float().permute(0, 3, 1, 2)
    model = patcher.model
    denoised = model.apply_model(x, torch.full((len(x),), sigma), c_crossattn=empty_context(len(x)))
    predicted = denoised.permute(0, 2, 3, 1).double().numpy()
    return float(np.mean([psnr(p, f) for p, f in zip(predicted, faces)]))


def oracle_x0_psnr(faces: np.ndarray, sigmas=SIGMAS) -> dict:
    """Per sigma ("1", "4"): the oracle's mean PSNR over ``faces`` (the average of two independent runs'
    posterior means), and the two runs' agreement (mean PSNR of one against the other: far above ``psnr``,
    it has converged)."""
    means = iter(posterior_means([(y, sigma, seed) for sigma in sigmas for y in noised(faces, sigma)
                                  for seed in (1, 2)]))
    figures = {}
    for sigma in sigmas:
        scores, agreement = [], []
        for face in faces:
            first, second = next(means), next(means)
            scores.append(psnr((first + second) / 2, face))
            agreement.append(psnr(first, second))
        figures[f"{sigma:g}"] = {"psnr": float(np.mean(scores)), "agreement": float(np.mean(agreement))}
    return figures


def noise_level(pixels: np.ndarray) -> np.ndarray:
    """Immerkaer's white-noise standard deviation estimate [B] of uint8 images [B, H, W, 3], channels averaged."""
    image = pixels.astype(np.float64)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    height, width = image.shape[1:3]
    residual = sum(kernel[i, j] * image[:, i:height - 2 + i, j:width - 2 + j]
                   for i in range(3) for j in range(3))
    return np.sqrt(np.pi / 2) * np.abs(residual).mean((1, 2, 3)) / 6


def sample(patcher, count: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, 32, 32, 3]: the host's KSampler (ddim, 20 steps, cfg 1) and its identity VAE."""
    import nodes

    from .model import empty_context, pixel_vae
    empty = [[empty_context(1), {}]]
    latent = {"samples": torch.zeros(count, 3, SIZE, SIZE)}
    samples = nodes.common_ksampler(patcher, seed, 20, 1.0, "ddim", "normal", empty, empty, latent)[0]
    return (pixel_vae().decode(samples["samples"]).float() * 255).round().to(torch.uint8).numpy()


def sample_quality(pixels: np.ndarray) -> dict:
    regressor = load_regressor()
    factors, redraw = read_and_redraw(regressor, pixels)
    clean, _ = dataset(256, HELD_OUT_SEED)
    limit = NOISY_FACTOR * float(noise_level(clean).max())
    levels = noise_level(pixels)
    _, clean_redraw = read_and_redraw(regressor, clean[:len(pixels)])
    return {"redraw_psnr_median": float(np.median(redraw)), "clean_redraw_psnr_median": float(np.median(clean_redraw)),
            "redraw_psnr_quartiles": [float(np.percentile(redraw, 25)), float(np.percentile(redraw, 75))],
            "noise_median": float(np.median(levels)), "noise_max": float(levels.max()),
            "clean_noise_max": limit / NOISY_FACTOR, "noisy_samples": int((levels > limit).sum()),
            "factor_spread": {name: float(v) for name, v in zip(FACTORS, factors.std(0))}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="",
                        help="exported weights or a training checkpoint (default: the committed model)")
    parser.add_argument("--faces", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracle (minutes) and report the model only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from harness.host import shared_host
    shared_host("cpu")
    from .model import WEIGHTS, load_patcher
    patcher = load_patcher(Path(args.weights) if args.weights else WEIGHTS)
    faces, trained_on = generator_faces(args.faces), generator_faces(args.faces, seed=0)
    # equal one-step PSNR on faces trained on and held out: the model underfits rather than overfits
    figures = {"world_x0_psnr": {f"{s:g}": round(model_x0_psnr(patcher, faces, s), 2) for s in SIGMAS},
               "world_x0_psnr_training_faces": {f"{s:g}": round(model_x0_psnr(patcher, trained_on, s), 2)
                                                for s in SIGMAS}}
    figures.update(sample_quality(sample(patcher, args.samples)))
    if not args.no_oracle:
        oracle = oracle_x0_psnr(faces)
        figures["oracle_x0_psnr"] = {s: round(o["psnr"], 2) for s, o in oracle.items()}
        figures["oracle_agreement_db"] = {s: round(o["agreement"], 2) for s, o in oracle.items()}
    figures = json.loads(json.dumps(figures), parse_float=lambda v: round(float(v), 2))
    print(json.dumps(figures) if args.json else "\n".join(f"{k}: {v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
