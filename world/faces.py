"""A world with known semantics: cartoon faces drawn from seven independent, labelled factors.

Every factor is a number in [0, 1]; the same factors always give the same picture, and
``sample_factors(count, seed)`` always gives the same factors. Local factors (smile, eye
openness) change a few pixels, global ones (face and hair hue, head size, position, background)
change many, so the world tests both kinds of edit.
"""
import colorsys

import numpy as np
from PIL import Image, ImageDraw

FACTORS = ("smile", "eye_open", "face_hue", "hair_hue", "head_size", "x_position", "background")
SIZE = 32  # pixels a side: the model's and the regressor's images
SUPERSAMPLING = 4


def sample_factors(count: int, seed: int) -> np.ndarray:
    """[count, len(FACTORS)] factors, independent and uniform in [0, 1]."""
    return np.random.default_rng(seed).random((count, len(FACTORS)))


def _rgb(hue: float, saturation: float, value: float) -> tuple:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def render(factors, size: int = SIZE) -> np.ndarray:
    """One face as a [size, size, 3] uint8 image (drawn 4x larger, then box-filtered down)."""
    f = dict(zip(FACTORS, (float(v) for v in factors)))
    side = size * SUPERSAMPLING
    shade = round(40 + 180 * f["background"])
    image = Image.new("RGB", (side, side), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    radius = side * (0.22 + 0.12 * f["head_size"])
    cx, cy = side * (0.35 + 0.3 * f["x_position"]), side * 0.55

    hair = _rgb(0.8 * f["hair_hue"], 0.75, 0.6)  # not the whole circle: hue 0 and 1 would look alike
    draw.ellipse((cx - 1.12 * radius, cy - 1.25 * radius, cx + 1.12 * radius, cy + 0.55 * radius), fill=hair)
    skin = _rgb(0.02 + 0.6 * f["face_hue"], 0.45, 0.95)
    draw.ellipse((cx - radius, cy - 0.95 * radius, cx + radius, cy + radius), fill=skin)

    eye_width, eye_height = 0.2 * radius, 0.04 * radius + 0.16 * radius * f["eye_open"]
    for side_sign in (-1, 1):
        ex, ey = cx + side_sign * 0.38 * radius, cy - 0.18 * radius
        draw.ellipse((ex - eye_width, ey - eye_height, ex + eye_width, ey + eye_height), fill=(250, 250, 250))
        pupil = min(eye_width, eye_height) * 0.7
        draw.ellipse((ex - pupil, ey - pupil, ex + pupil, ey + pupil), fill=(20, 20, 30))

    curvature = (2 * f["smile"] - 1) * 0.28 * radius  # > 0: the corners rise (a smile)
    mouth_y, half_width = cy + 0.45 * radius, 0.45 * radius
    points = [(cx + t * half_width, mouth_y - curvature * (t * t - 0.5)) for t in np.linspace(-1, 1, 17)]
    draw.line(points, fill=(120, 20, 30), width=max(2, round(0.09 * radius)))
    return np.asarray(image.resize((size, size), Image.BOX))


def dataset(count: int, seed: int, size: int = SIZE):
    """(images [count, size, size, 3] uint8, factors [count, len(FACTORS)])."""
    factors = sample_factors(count, seed)
    return np.stack([render(row, size) for row in factors]), factors
