"""Trains the faces world's UNet (world/model.py) on world/faces.py images on the host's default
discrete schedule: v-prediction (or eps, the first model's), Adam, an EMA of the weights,
optionally started from exported weights (--init; narrower ones are widened to --width keeping their
function, world/model.py ``widen``), in float32 or bfloat16 autocast (--bf16: 1.9x faster on CPUs with
AVX-512 BF16). Deterministic for a seed (each step's
batch, timesteps and noise come from the seed and the step number), and resumable: it saves a
safetensors checkpoint every --every steps and continues from it when run again.

    .venv/bin/python -m world.train --steps 20000           # train, or resume, to step 20000
    .venv/bin/python -m world.train --steps 20000 --export  # then write world/faces_unet.safetensors
    .venv/bin/python -m world.train --seconds 300 --export out/w.safetensors  # five minutes' more, written there
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness.comfyui import make_importable

REPO = Path(__file__).resolve().parent.parent
make_importable()
import comfy.options  # noqa: E402,F401  (the host's argument parsing stays off)
from comfy.cli_args import args as host_args  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
host_args.cpu = DEVICE == "cpu"

from world.faces import dataset  # noqa: E402
from world.model import (  # noqa: E402
    IMAGE_SIZE,
    UNET,
    build_model,
    empty_context,
    initialise,
    read_weights,
    unet_config,
    widen,
)
from world.model import WEIGHTS as EXPORT  # noqa: E402


def arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000, help="train until this step")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=20000, help="training images drawn from the world")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--every", type=int, default=250, help="checkpoint every this many steps")
    parser.add_argument("--prediction", choices=("v", "eps"), default="v", help="what the network predicts")
    parser.add_argument("--init", default="", help="start from these weights (exported, or a checkpoint's EMA)")
    parser.add_argument("--width", type=int, default=UNET["model_channels"], help="channels at the first level")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights, Adam and EMA stay float32)")
    parser.add_argument("--checkpoint", type=Path, default=REPO / ".cache" / "world-train" / "checkpoint.safetensors")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--seconds", type=float, default=float("inf"),
                        help="stop after this long (a checkpoint is saved, and --export done, as at --steps)")
    parser.add_argument("--export", nargs="?", const=str(EXPORT), default=None, metavar="FILE",
                        help="write the EMA weights to FILE (default world/faces_unet.safetensors)")
    return parser.parse_args()


def save_checkpoint(path, unet, ema, optimizer, step, settings, losses):
    tensors = {f"unet.{k}": v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous().cpu() for k, v in ema.items()})
    for i, parameter in enumerate(unet.parameters()):
        state = optimizer.state.get(parameter)
        if state:
            tensors[f"adam.{i}.exp_avg"] = state["exp_avg"].cpu()
            tensors[f"adam.{i}.exp_avg_sq"] = state["exp_avg_sq"].cpu()
            tensors[f"adam.{i}.step"] = torch.as_tensor(state["step"]).reshape(1).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"step": str(step), "settings": json.dumps(settings),
                                               "losses": json.dumps(losses[-200:])})
    os.replace(partial, path)


def load_checkpoint(path, unet, ema, optimizer, settings):
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        if json.loads(metadata["settings"]) != settings:
            sys.exit(f"{path} was trained with other settings {metadata['settings']}; delete it to start over")
        unet.load_state_dict({k[5:]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")})
        ema.update({k[4:]: f.get_tensor(k).to(DEVICE) for k in f.keys() if k.startswith("ema.")})
        for i, parameter in enumerate(unet.parameters()):
            if f"adam.{i}.exp_avg" in f.keys():
                optimizer.state[parameter] = {"exp_avg": f.get_tensor(f"adam.{i}.exp_avg").to(DEVICE),
                                              "exp_avg_sq": f.get_tensor(f"adam.{i}.exp_avg_sq").to(DEVICE),
                                              "step": f.get_tensor(f"adam.{i}.step")[0]}
        return int(metadata["step"]), json.loads(metadata["losses"])


def main():
    args = arguments()
    if args.export:
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    unet_settings = unet_config(args.width)
    settings = {**{k: getattr(args, k) for k in ("batch", "lr", "seed", "images", "ema", "prediction", "init")},
                **({"bf16": True} if args.bf16 else {}), "unet": unet_settings}
    images, _ = dataset(args.images, args.seed, IMAGE_SIZE)
    data = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).to(DEVICE)  # the identity VAE's [-1, 1]
    model = build_model(prediction=args.prediction, unet=unet_settings)
    unet = model.diffusion_model
    initialise(unet, args.seed)
    if args.init:
        weights, _, _ = read_weights(Path(args.init))
        unet.load_state_dict(widen(weights, unet.state_dict(), args.seed))
    unet.to(DEVICE)
    unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.lr)
    alphas_cumprod = (1 / (1 + model.model_sampling.sigmas.float() ** 2)).to(DEVICE)
    step, losses = (load_checkpoint(args.checkpoint, unet, ema, optimizer, settings) if args.checkpoint.exists()
                    else (0, []))
    context = empty_context(args.batch).to(DEVICE)
    print(f"training from step {step} to {args.steps}, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M "
          f"parameters, batch {args.batch}", flush=True)
    start = began = time.perf_counter()
    while step < args.steps and time.perf_counter() - began < args.seconds:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x0 = data[torch.randint(len(data), (args.batch,), generator=generator).to(DEVICE)]
        t = torch.randint(len(alphas_cumprod), (args.batch,), generator=generator).to(DEVICE)
        noise = torch.randn(x0.shape, generator=generator).to(DEVICE)
        keep = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noisy = keep.sqrt() * x0 + (1 - keep).sqrt() * noise
        target = noise if args.prediction == "eps" else keep.sqrt() * noise - (1 - keep).sqrt() * x0
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=args.bf16):
            prediction = unet(noisy, timesteps=t.float(), context=context)
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        losses.append(round(loss.item(), 5))
        if step % 50 == 0:
            rate = (time.perf_counter() - start) / 50
            start = time.perf_counter()
            print(f"step {step}: loss {sum(losses[-50:]) / 50:.4f}, {rate:.2f} s/step", flush=True)
        if step % args.every == 0 or step == args.steps:
            save_checkpoint(args.checkpoint, unet, ema, optimizer, step, settings, losses)
    if step < args.steps:  # stopped by --seconds
        save_checkpoint(args.checkpoint, unet, ema, optimizer, step, settings, losses)
    if args.export:
        export = Path(args.export)
        metadata = {"steps": str(step), "prediction": args.prediction, "settings": json.dumps(settings),
                    "unet": f"world/model.py unet_config({args.width})",
                    "final_loss": str(sum(losses[-200:]) / max(len(losses[-200:]), 1))}
        save_file({k: v.half().contiguous().cpu() for k, v in ema.items()}, str(export), metadata=metadata)
        print(f"wrote {export} at step {step} ({export.stat().st_size / 2 ** 20:.1f} MB)")


if __name__ == "__main__":
    main()
