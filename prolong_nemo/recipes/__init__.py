"""ProLong stage recipes: what a run is, never how it runs (that is `prolong_nemo.training`).

`config` (the typed schema), `stages` (Hydra loading of the stage YAMLs), `plan` (checks and
estimates before anything launches) and `launch` (NeMo-Run submission). Nothing here imports
`prolong_nemo.training`. Only `config` and `stages` are imported here; `plan` and `launch` are
imported on use (NeMo-Run exists only where it is installed).
"""

from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.recipes.stages import load_recipe

__all__ = ["RecipeConfig", "RecipeError", "load_recipe"]
