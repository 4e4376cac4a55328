"""What every node family shares: the DIRECTIONS type, the category, the directions folder, input checks."""
import math

import torch

import folder_paths

DIRECTIONS = "DIRECTIONS"
CATEGORY = "semantic directions"
FOLDER = "directions"


def directions_folder() -> str:
    """The folder new direction files go to: the first registered ``directions`` path."""
    return folder_paths.get_folder_paths(FOLDER)[0]


def finite(name: str, value: float) -> float:
    """A FLOAT input, refused by name when NaN or infinite (the host's min/max checks let NaN through)."""
    if not math.isfinite(value):
        raise ValueError(f"{name}: {value} is not a finite number")
    return value


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite. Its minimum and maximum say it (both propagate NaN) in one pass
    without a mask: on a 1280 x 1280 weight 0.45 ms against isfinite(...).all()'s 5.2 ms on one core."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def finite_tensor(name: str, tensor: torch.Tensor, what: str = "values") -> torch.Tensor:
    """A tensor input (LATENT samples, IMAGE, MASK), refused by name when it holds NaN or infinite values."""
    if not all_finite(tensor):
        raise ValueError(f"{name}: the {what} hold NaN or infinite values")
    return tensor


def parse_numbers(text: str, name: str) -> list:
    """'-2, -1, 0, 1, 2' -> [-2.0, -1.0, 0.0, 1.0, 2.0]; every value must be a finite number.

    ``name`` is the node input the text came from, for the error message.
    """
    values = []
    for part in text.replace(";", ",").split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{name}: {part.strip()!r} is not a number; expected comma-separated "
                             f"numbers like -2,-1,0,1,2") from None
        if not math.isfinite(value):
            raise ValueError(f"{name}: {part.strip()} is not finite")
        values.append(value)
    return values
