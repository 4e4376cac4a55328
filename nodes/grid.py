"""Labelled Image Grid: a strength sweep's batch of images as one picture with its alphas written on it."""
from .common import CATEGORY, finite_tensor
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
            "columns": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Images per row; 0 puts all in one row."}),
        }}

    def grid(self, images, labels, columns):
        names = [part.strip() for part in labels.replace(";", ",").split(",")] if labels.strip() else \
            [str(i) for i in range(images.shape[0])]
        finite_tensor("images", images, "images' pixels")
        if len(names) != images.shape[0]:
            raise ValueError(f"labels: {len(names)} labels for {images.shape[0]} images; give one per image")
        return (labelled_grid(images, names, columns),)


NODE_CLASS_MAPPINGS = {"LabelledImageGrid": LabelledImageGrid}
NODE_DISPLAY_NAME_MAPPINGS = {"LabelledImageGrid": "Labelled Image Grid"}
