"""Host adapters: one module per node family, each exporting its own mappings."""
from . import apply, asyrp, discover, files, grid, invert, jacobian, projection, samples, svd

_FAMILIES = (discover, samples, jacobian, projection, apply, asyrp, invert, svd, files, grid)

NODE_CLASS_MAPPINGS = {name: cls for family in _FAMILIES
                       for name, cls in family.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: label for family in _FAMILIES
                              for name, label in family.NODE_DISPLAY_NAME_MAPPINGS.items()}
