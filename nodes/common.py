"""What every node family shares: the DIRECTIONS type, the category and the directions folder."""
import folder_paths

DIRECTIONS = "DIRECTIONS"
CATEGORY = "semantic directions"
FOLDER = "directions"


def directions_folder() -> str:
    """The folder new direction files go to: the first registered ``directions`` path."""
    return folder_paths.get_folder_paths(FOLDER)[0]
