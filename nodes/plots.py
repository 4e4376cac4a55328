"""Small plots as host IMAGE tensors ([1, H, W, 3] floats), drawn with Pillow."""
import numpy as np
import torch
from PIL import Image, ImageDraw

from .host import GROUPS

_GROUP_COLOURS = {"input": (52, 110, 235), "middle": (40, 170, 80), "output": (235, 120, 40),
                  "double": (170, 60, 200), "single": (30, 170, 170), "joint": (200, 40, 60),
                  "transformer": (160, 140, 20), "other": (120, 120, 120)}


def _group(site: str) -> str:
    """The layers group a site belongs to (UNet input, middle, output; DiT double, single, joint, transformer)."""
    return next((group for group, prefix in GROUPS.items() if prefix and site.startswith(prefix + ".")), "other")


def _line_chart(draw, box, lines, title, x_labels, x_title, y_range, y_ticks, y_format):
    """Draws ``lines`` ([(values, colour)], x = index) in ``box`` with ticks, labels and a title."""
    left, top, right, bottom = box
    low, high = y_range
    count = max(len(values) for values, _ in lines)

    def x_of(i):
        return left + (right - left) * i / (count - 1) if count > 1 else (left + right) / 2

    def y_of(value):
        return bottom - (bottom - top) * (value - low) / ((high - low) or 1.0)
    draw.text((left, top - 28), title, fill="black")
    draw.rectangle(box, outline="black")
    for tick in y_ticks:
        draw.line((left - 4, y_of(tick), left, y_of(tick)), fill="black")
        draw.text((left - 48, y_of(tick) - 6), y_format(tick), fill="black")
    for i, label in x_labels:
        draw.text((x_of(i) - 4, bottom + 6), label, fill="black")
    draw.text(((left + right) / 2 - 40, bottom + 24), x_title, fill="black")
    for values, colour in lines:
        points = [(x_of(i), y_of(float(v))) for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)


def _legend(draw, right, top, entries):
    for row, (label, colour) in enumerate(entries):
        y = top + 10 + 16 * row
        draw.line((right - 120, y + 6, right - 100, y + 6), fill=colour, width=3)
        draw.text((right - 94, y), label, fill="black")


def _to_image(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def gain_spectrum_image(gains: dict, width: int = 768, height: int = 512) -> torch.Tensor:
    """One line per site: gain i / gain 1 against i. The elbow says how many directions matter."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    lines, groups = [], {}
    for site, values in gains.items():
        values = np.asarray(values, dtype=np.float64)
        groups[_group(site)] = _GROUP_COLOURS[_group(site)]
        lines.append((values / values[0] if values[0] > 0 else np.zeros_like(values), groups[_group(site)]))
    count = max(len(values) for values, _ in lines)
    _line_chart(draw, (60, 40, width - 20, height - 50), lines,
                "gain spectrum per layer (relative to each layer's top gain)",
                [(i, str(i + 1)) for i in range(count)], "direction index", (0.0, 1.0),
                (0.0, 0.25, 0.5, 0.75, 1.0), lambda t: f"{t:.2f}")
    _legend(draw, width - 20, 40, [(f"{group} blocks", colour) for group, colour in groups.items()])
    return _to_image(image)


def _step_colour(i: int, count: int) -> tuple:
    """Blue for the first step to red for the last."""
    f = i / max(count - 1, 1)
    return (int(40 + 200 * f), 60, int(240 - 200 * f))


_CHANNEL_COLOURS = [(52, 110, 235), (40, 170, 80), (235, 120, 40), (170, 60, 200), (200, 40, 60), (30, 170, 170),
                    (120, 120, 120), (160, 140, 20)]


def svd_analysis_image(spectra: torch.Tensor, distances: torch.Tensor, k: int, panel: int = 256) -> torch.Tensor:
    """Left: each channel's log10 singular spectrum, one line per step (blue first, red last).
    Right: the Grassmann distance between consecutive steps' leading-k subspaces, one line per
    channel. ``spectra`` [steps, C, r], ``distances`` [steps - 1, C]."""
    steps, channels, rank = spectra.shape
    columns = int(np.ceil(np.sqrt(channels)))
    rows = -(-channels // columns)
    width, height = columns * panel + 2 * panel + 40, max(rows * panel, 2 * panel) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    logs = spectra.double().clamp(min=1e-12).log10()
    low, high = float(logs.min()), float(logs.max())
    ticks = [low + (high - low) * f for f in (0.0, 0.5, 1.0)]
    every = max(rank // 4, 1)
    for c in range(channels):
        x, y = (c % columns) * panel, (c // columns) * panel
        _line_chart(draw, (x + 58, y + 36, x + panel - 10, y + panel - 46),
                    [(logs[s, c].tolist(), _step_colour(s, steps)) for s in range(steps)],
                    f"channel {c}: log10 singular values", [(i, str(i)) for i in range(0, rank, every)],
                    "index", (low, high), ticks, lambda t: f"{t:.1f}")
    draw.text((10, height - 16), "one line per latent, in batch order: blue the first, red the last", fill="black")
    x = columns * panel + 40
    top_distance = max(float(distances.max()), 1e-6)
    _line_chart(draw, (x + 58, 36, x + 2 * panel - 10, 2 * panel - 46),
                [(distances[:, c].tolist(), _CHANNEL_COLOURS[c % len(_CHANNEL_COLOURS)]) for c in range(channels)],
                f"leading-{k} subspace distance, step i to i+1", [(i, str(i)) for i in range(steps - 1)],
                "step pair", (0.0, top_distance), (0.0, top_distance / 2, top_distance), lambda t: f"{t:.2f}")
    _legend(draw, x + 2 * panel - 10, 36, [(f"channel {c}", _CHANNEL_COLOURS[c % len(_CHANNEL_COLOURS)])
                                           for c in range(min(channels, len(_CHANNEL_COLOURS)))])
    return _to_image(image)


def labelled_grid(images: torch.Tensor, labels: list, columns: int, label_height: int = 24) -> torch.Tensor:
    """[B, H, W, 3] images in a grid of ``columns``, each with its label above it, as [1, H', W', 3]."""
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    columns = max(1, min(columns or count, count))
    rows = -(-count // columns)
    canvas = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for i in range(count):
        x, y = (i % columns) * width, (i // columns) * (height + label_height)
        canvas.paste(Image.fromarray(pixels[i]), (x, y + label_height))
        if i < len(labels):
            draw.text((x + 4, y + 6), labels[i], fill="black")
    return _to_image(canvas)
