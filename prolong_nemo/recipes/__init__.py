"""ProLong stage recipes: typed configs, Hydra loading, planning, Megatron-Bridge glue, launch.

Only `config` and `stages` are imported here; `plan`, `bridge`, `entry` and `launch` are
imported on use (Bridge and NeMo-Run exist only where they are installed).
"""

from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.recipes.stages import load_recipe

__all__ = ["RecipeConfig", "RecipeError", "load_recipe"]
