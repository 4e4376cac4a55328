"""Labelled Image Grid: a strength sweep's batch of images as one picture with its alphas written on it."""
from .common import CATEGORY, DIRECTIONS, finite_tensor
from .plots import labelled_grid


class LabelledImageGrid:
    DESCRIPTION = ("Lays out a batch of images as one grid image with a label above each, e.g. the alphas "
                   "of a sweep rendered by Apply Direction's alpha_list.")
    CATEGORY = CATEGORY
    FUNCTION = "grid"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The grid as a single image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The batch to lay out, in order."}),
            "labels": ("STRING", {"default": "", "tooltip":
                       "Comma-separated labels, one per image (paste the alpha_list here); empty numbers them."}),
            "columns": ("INT", {"default": 0, "min": 0, "max": 64,
                                "tooltip": "Images per row; 0 puts all in one row."}),
        }, "optional": {
            "directions": (DIRECTIONS, {"tooltip": "A named direction (from a pair node): numeric labels (alphas) "
                                                   "then say what they move toward, e.g. 'smiling 0.5', 'neutral 1'."}),
        }}

    def grid(self, images, labels, columns, directions=None):
        if not labels.strip():  # numbered images, not alphas: a named direction has nothing to say of them
            names = [str(i) for i in range(images.shape[0])]
        else:
            names = [part.strip() for part in labels.replace(";", ",").split(",")]
            if directions is not None and "target" in directions.params:
                names = [named(label, directions.params["source"], directions.params["target"]) for label in names]
        finite_tensor("images", images, "images' pixels")
        if len(names) != images.shape[0]:
            raise ValueError(f"labels: {len(names)} labels for {images.shape[0]} images; give one per image")
        return (labelled_grid(images, names, columns),)


def named(label: str, source: str, target: str) -> str:
    """'0.5' -> 'smiling 0.5', '-1' -> 'neutral 1', '0' -> 'unedited'; other labels unchanged."""
    try:
        alpha = float(label)
    except ValueError:
        return label
    return "unedited" if alpha == 0 else f"{target if alpha > 0 else source} {abs(alpha):g}"


NODE_CLASS_MAPPINGS = {"LabelledImageGrid": LabelledImageGrid}
NODE_DISPLAY_NAME_MAPPINGS = {"LabelledImageGrid": "Labelled Image Grid"}
