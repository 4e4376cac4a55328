"""Save Directions and Load Directions: direction sets as files in models/directions."""
import os

import folder_paths

from ..directions.directionset import describe
from ..directions.fileformat import SUFFIX, DirectionFileError, load_directions, safe_file_path, save_directions
from .common import CATEGORY, DIRECTIONS, FOLDER, directions_folder


class SaveDirections:
    DESCRIPTION = ("Writes a direction set to models/directions as a .safetensors file (tensors plus "
                   "a JSON description; never a pickle), for Load Directions to reuse later.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "directions": (DIRECTIONS, {"tooltip": "The direction set to save."}),
            "filename": ("STRING", {"default": "my_directions", "tooltip":
                         "Name inside models/directions; '/' makes sub-folders, .safetensors is "
                         "added. Letters, digits, spaces and ._-+=()[] only."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                          "Replace a file of the same name. Off: saving to an existing name fails."}),
        }}

    def save(self, directions, filename, overwrite):
        folder = directions_folder()
        try:
            path = save_directions(directions, safe_file_path(folder, filename), overwrite=overwrite)
        except DirectionFileError as err:
            raise DirectionFileError(f"filename: {err}") from None
        name = os.path.relpath(path, os.path.realpath(folder)).replace(os.sep, "/")
        return {"ui": {"text": [name]}}


class LoadDirections:
    DESCRIPTION = ("Reads a direction set saved by Save Directions from models/directions, checking "
                   "every tensor and the metadata; a damaged or foreign file gets a one-line error.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DIRECTIONS, "STRING")
    RETURN_NAMES = ("directions", "summary")
    OUTPUT_TOOLTIPS = ("The loaded direction set.", "Method, model family, and each site's count x width.")

    @classmethod
    def INPUT_TYPES(cls):
        files = [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(SUFFIX)]
        return {"required": {
            "file": (sorted(files), {"tooltip": "A .safetensors direction file in models/directions."}),
        }}

    @classmethod
    def IS_CHANGED(cls, file):
        path = folder_paths.get_full_path(FOLDER, file)
        if path is None:
            return float("nan")
        stat = os.stat(path)
        return f"{stat.st_mtime_ns}:{stat.st_size}"

    def load(self, file):
        path = folder_paths.get_full_path(FOLDER, file)
        if path is None:
            raise FileNotFoundError(f"file: {file} is not in models/directions; refresh the list")
        try:
            dset = load_directions(path)
        except DirectionFileError as err:
            raise DirectionFileError(f"file: {err}") from None
        return (dset, describe(dset))


NODE_CLASS_MAPPINGS = {"SaveDirections": SaveDirections, "LoadDirections": LoadDirections}
NODE_DISPLAY_NAME_MAPPINGS = {"SaveDirections": "Save Directions", "LoadDirections": "Load Directions"}
