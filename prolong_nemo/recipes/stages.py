"""Load the ProLong stage recipes (Hydra YAML in `recipes/`) into validated `RecipeConfig`s.

    load_recipe("stage_512k", ["optim.lr=1e-5"])   # the paper's LR instead of the script's

Composition uses Hydra's compose API (defaults lists, `key=value` / `+key=value` overrides)
on top of the structured schema `recipe_schema` (the `RecipeConfig` dataclasses, registered in
Hydra's ConfigStore and listed first in `common.yaml`'s defaults), so keys and types are checked
by OmegaConf as the YAMLs and overrides merge; OmegaConf resolves interpolations (`${name}`,
`${oc.env:VAR,default}`) and builds the `RecipeConfig`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from prolong_nemo.recipes.config import RecipeConfig, RecipeError, config_error

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


SCHEMA_NAME = "recipe_schema"


def register_schema() -> None:
    """Put the recipe dataclasses in Hydra's ConfigStore as `recipe_schema` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RecipeConfig)


def _resolve_name(name: str, directory: Path | None) -> tuple[Path, str]:
    if name.endswith((".yaml", ".yml")):
        path = Path(name).resolve()
        if not path.is_file():
            raise RecipeError(f"recipe file {name} does not exist")
        directory, name = path.parent, path.stem
    directory = Path(directory or recipes_dir()).resolve()
    if not (directory / f"{name}.yaml").is_file():
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(available_recipes(directory))}")
    return directory, name


def _bridge_field(override: str) -> str:
    """`bridge.<section>.<field>=v` sets a Bridge field the schema does not list: Hydra's `++`
    (add or override), so the user need not know whether a YAML already set it."""
    return f"++{override}" if override.startswith("bridge.") and "=" in override else override


def compose_config(name: str, overrides: Sequence[str] = (), directory: Path | None = None):
    """The composed recipe as an OmegaConf `DictConfig` typed by the schema (interpolations unresolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    directory, name = _resolve_name(name, directory)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            return compose(config_name=name, overrides=[_bridge_field(o) for o in overrides])
    except (HydraException, OmegaConfBaseException) as e:
        raise RecipeError(f"recipe {name!r}: {config_error(e)}") from None


def compose_recipe(name: str, overrides: Sequence[str] = (), directory: Path | None = None) -> dict:
    """The composed, resolved recipe as a plain dict. `name` is a recipe name or a YAML path."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose_config(name, overrides, directory)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise RecipeError(f"recipe {cfg.get('name', name)!r}: {config_error(e)}") from None


def load_recipe(name: str, overrides: Sequence[str] = (), *, validate: bool = True,
                directory: Path | None = None) -> RecipeConfig:
    """Compose `recipes/<name>.yaml` with Hydra overrides into a (validated) `RecipeConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose_config(name, overrides, directory)
    try:
        # Merged as plain data onto the schema once more: a `+key=value` that added a key the
        # schema lacks is refused here (Hydra's `+` may add keys to a typed node).
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.to_container(cfg))
        OmegaConf.resolve(cfg)
        recipe = OmegaConf.to_object(cfg)  # the dataclasses themselves, built by OmegaConf
    except OmegaConfBaseException as e:
        raise RecipeError(f"recipe {name!r}: {config_error(e)}") from None
    if not isinstance(recipe, RecipeConfig):  # a YAML that does not list `common` (the schema)
        raise RecipeError(f"recipe {name!r} does not build on the recipe schema: list `common` in its defaults")
    try:  # a choice, not a type: checked here so that nothing downstream meets an unknown preset
        recipe.arch
    except ValueError as e:
        raise RecipeError(f"recipe {name!r}: model.preset: {e}") from None
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
