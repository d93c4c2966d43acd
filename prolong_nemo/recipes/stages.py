"""Load the ProLong stage recipes (Hydra YAML in `recipes/`) into validated `RecipeConfig`s.

    load_recipe("stage_512k", ["optim.lr=1e-5"])   # the paper's LR instead of the script's

Composition uses Hydra's compose API (defaults lists, `key=value` / `+key=value` overrides),
then OmegaConf resolves interpolations (`${name}`, `${oc.env:VAR,default}`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from prolong_nemo.recipes.config import RecipeConfig, RecipeError

# The three stages of the paper and their CPU miniatures (same shape, tiny model).
STAGE_RECIPES: tuple[str, ...] = ("stage_64k", "stage_512k", "sft")
CPU_RECIPES: dict[str, str] = {name: f"{name}_cpu" for name in STAGE_RECIPES}


def recipes_dir() -> Path:
    """`$PROLONG_RECIPES_DIR`, else the repository's `recipes/` (editable or container install)."""
    env = os.environ.get("PROLONG_RECIPES_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"
    if not (path / "common.yaml").is_file():
        raise RecipeError(f"no recipes found in {path} (set PROLONG_RECIPES_DIR to the recipes/ folder)")
    return path


def available_recipes(directory: Path | None = None) -> list[str]:
    directory = directory or recipes_dir()
    return sorted(p.stem for p in directory.glob("*.yaml") if p.stem != "common")


def compose_recipe(name: str, overrides: Sequence[str] = (), directory: Path | None = None) -> dict:
    """The composed, resolved recipe as a plain dict. `name` is a recipe name or a YAML path."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if name.endswith((".yaml", ".yml")):
        path = Path(name).resolve()
        if not path.is_file():
            raise RecipeError(f"recipe file {name} does not exist")
        directory, name = path.parent, path.stem
    directory = Path(directory or recipes_dir()).resolve()
    if not (directory / f"{name}.yaml").is_file():
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(available_recipes(directory))}")
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides))
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise RecipeError(f"recipe {name!r} with overrides {list(overrides)}: {e}") from None
    return raw


def load_recipe(name: str, overrides: Sequence[str] = (), *, validate: bool = True,
                directory: Path | None = None) -> RecipeConfig:
    """Compose `recipes/<name>.yaml` with Hydra overrides into a (validated) `RecipeConfig`."""
    recipe = RecipeConfig.from_dict(compose_recipe(name, overrides, directory))
    return recipe.validate() if validate else recipe


def stage_64k(overrides: Sequence[str] = ()) -> RecipeConfig:
    """Stage 1: 64K packed sequences, rope_theta 8e6, LR 1e-5, 5,000 steps x 64 sequences."""
    return load_recipe("stage_64k", overrides)


def stage_512k(overrides: Sequence[str] = ()) -> RecipeConfig:
    """Stage 2: 512K sequences, rope_theta 1.28e8, LR 5e-6 (paper text: 1e-5), 2,500 x 16."""
    return load_recipe("stage_512k", overrides)


def sft(overrides: Sequence[str] = ()) -> RecipeConfig:
    """SFT: UltraChat 64K with instruction masks, LR 2e-5, 250 steps x 64, weights only."""
    return load_recipe("sft", overrides)
