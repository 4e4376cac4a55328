"""Project Out Directions: a direction made blind to others (conditional editing)."""
import logging

from ..directions.projection import label, project_out_set
from .common import CATEGORY, DIRECTIONS


class ProjectOutDirections:
    DESCRIPTION = ("Removes from each direction its components along other directions at the same sites, so "
                   "that it stops moving what they move: e.g. a 'smiling' pair direction with the 'bright "
                   "background' pair direction projected out (InterFaceGAN's conditional editing). Chain it to "
                   "remove several sets. A pair's strength shrinks to what is left of its change, so alpha 1 "
                   "still means the pair's own change, less the removed part.")
    CATEGORY = CATEGORY
    FUNCTION = "project"
    RETURN_TYPES = (DIRECTIONS, "STRING")
    RETURN_NAMES = ("directions", "summary")
    OUTPUT_TOOLTIPS = ("The directions, each orthogonal to every direction of remove at its site; sites that "
                       "remove lacks pass unchanged.",
                       "How much of each direction's length was kept, per site: a small share means it "
                       "mostly moved what remove moves.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "directions": (DIRECTIONS, {"tooltip": "The directions to edit along (any method, e.g. a named "
                                                   "pair direction)."}),
            "remove": (DIRECTIONS, {"tooltip": "Directions of the same model whose effect to keep out: all of "
                                               "them at each site the two sets share."}),
        }}

    def project(self, directions, remove):
        projected, kept = project_out_set(directions, remove)
        lines = [f"{site}: " + ", ".join(f"#{i} keeps {float(k):.0%}" for i, k in enumerate(lengths))
                 for site, lengths in kept.items()]
        summary = "\n".join([f"{label(remove)} projected out of {label(directions)} at {len(kept)} of "
                             f"{len(directions.sites)} sites", *lines])
        logging.info("Project Out Directions: %s", summary.replace("\n", "; "))
        return projected, summary


NODE_CLASS_MAPPINGS = {"ProjectOutDirections": ProjectOutDirections}
NODE_DISPLAY_NAME_MAPPINGS = {"ProjectOutDirections": "Project Out Directions"}
