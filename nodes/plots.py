"""Small plots as host IMAGE tensors ([1, H, W, 3] floats), drawn with Pillow."""
import numpy as np
import torch
from PIL import Image, ImageDraw

_GROUP_COLOURS = {"input": (52, 110, 235), "middle": (40, 170, 80), "output": (235, 120, 40)}


def _group(site: str) -> str:
    return next((g for g in _GROUP_COLOURS if site.startswith(g)), "input")


def gain_spectrum_image(gains: dict, width: int = 768, height: int = 512) -> torch.Tensor:
    """One line per site: gain i / gain 1 against i. The elbow says how many directions matter."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 40, height - 50
    draw.text((left, 12), "gain spectrum per layer (relative to each layer's top gain)", fill="black")
    draw.rectangle((left, top, right, bottom), outline="black")
    count = max(len(g) for g in gains.values())
    x_of = (lambda i: left + (right - left) * i / (count - 1)) if count > 1 else (lambda i: (left + right) / 2)
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - (bottom - top) * fraction
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((12, y - 6), f"{fraction:.2f}", fill="black")
    for i in range(count):
        draw.text((x_of(i) - 4, bottom + 8), str(i + 1), fill="black")
    draw.text(((left + right) / 2 - 40, height - 22), "direction index", fill="black")
    for site, values in gains.items():
        values = np.asarray(values, dtype=np.float64)
        relative = values / values[0] if values[0] > 0 else np.zeros_like(values)
        points = [(x_of(i), bottom - (bottom - top) * r) for i, r in enumerate(relative)]
        colour = _GROUP_COLOURS[_group(site)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    for row, (group, colour) in enumerate(_GROUP_COLOURS.items()):
        y = top + 10 + 16 * row
        draw.line((right - 120, y + 6, right - 100, y + 6), fill=colour, width=3)
        draw.text((right - 94, y), f"{group} blocks", fill="black")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


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
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]
