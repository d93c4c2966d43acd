"""`prolong-nemo train <recipe> [overrides]`: pick the backend that runs a recipe here, run it.

- `bridge` (GPU + Megatron-Bridge, an NGC NeMo container; `training/bridge/`): under torchrun,
  every rank runs `bridge.main.main` (Bridge `pretrain(cfg, forward_step)`); started outside
  torchrun, this re-executes itself as `torchrun --nproc-per-node <gpus_per_node>
  recipes/bridge_entry.py ...` (one node; use `prolong-nemo launch` for Slurm / several nodes),
  with the same job environment as `launch` (`CUDA_DEVICE_MAX_CONNECTIONS=1` unless already set,
  `cluster.env`).
- `cpu` (`training/cpu/`): the megatron-core loop on gloo trains the stage's CPU miniature
  (`<recipe>_cpu`: same schedule shape, tiny model), with the same start points (`start.py`),
  schedule restart (`schedule.py`) and progress line (`progress.py`) as the Bridge backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Callable, Literal, Sequence

from prolong_nemo.errors import UserError
from prolong_nemo.recipes.config import RecipeError
from prolong_nemo.recipes.stages import CPU_RECIPES

Backend = Literal["auto", "bridge", "cpu"]


def bridge_unavailable() -> str | None:
    """Why the Megatron-Bridge backend cannot run here (None: it can). Bridge imports
    Transformer Engine, which needs a GPU."""
    import torch

    if importlib.util.find_spec("megatron.bridge") is None:
        return "Megatron-Bridge (megatron.bridge) is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def bridge_available() -> bool:
    return bridge_unavailable() is None


def select_backend(requested: Backend = "auto") -> Literal["bridge", "cpu"]:
    if requested == "auto":
        return "bridge" if bridge_available() else "cpu"
    if requested == "bridge" and not bridge_available():
        raise RecipeError(f"the bridge backend needs a GPU and Megatron-Bridge (an NGC NeMo container): "
                          f"{bridge_unavailable()}")
    return requested


# backend -> the module whose `run_recipe(recipe_name, overrides, *, log, exit_after,
# synthetic_data) -> exit code` runs a recipe on it; a new backend is one module and one line.
BACKENDS = {"bridge": "prolong_nemo.training.bridge.torchrun", "cpu": "prolong_nemo.training.cpu.main"}


def train_recipe(recipe_name: str, overrides: Sequence[str] = (), *, backend: Backend = "auto",
                 log: Callable[[str], None] = print, exit_after: int | None = None,
                 synthetic_data: bool = False) -> int:
    """Train `recipe_name` with Hydra `overrides`; returns a process exit code.

    A full-size stage never silently becomes its CPU miniature: on a GPU node with a broken
    container that would train a different model with the user's overrides. `auto` refuses
    there; `--backend cpu` (or the `_cpu` recipe) asks for the miniature.
    """
    chosen = select_backend(backend)
    if backend == "auto" and chosen == "cpu" and recipe_name in CPU_RECIPES:
        raise RecipeError(f"{recipe_name} is a full-size recipe and the Megatron-Bridge backend cannot run here "
                          f"({bridge_unavailable()}); to train its CPU miniature ask for it: `prolong-nemo train "
                          f"{CPU_RECIPES[recipe_name]}` or `prolong-nemo train {recipe_name} --backend cpu`")
    module = importlib.import_module(BACKENDS[chosen])
    return module.run_recipe(recipe_name, list(overrides), log=log, exit_after=exit_after,
                             synthetic_data=synthetic_data)


def print_job_config(recipe_name: str, overrides: Sequence[str] = (), *, backend: Backend = "auto") -> int:
    """`prolong-nemo train <recipe> --cfg job`: the composed recipe, and the Megatron-Bridge
    ConfigContainer the bridge backend builds from it (flattened); nothing is trained.
    `--backend cpu` shows the recipe the CPU backend would train (a full-size stage's miniature)."""
    from prolong_nemo.recipes.stages import load_recipe
    from prolong_nemo.training.bridge.sections import container_view
    from prolong_nemo.training.start import StartPoint, resolve_start

    name = CPU_RECIPES.get(recipe_name, recipe_name) if backend == "cpu" else recipe_name
    recipe = load_recipe(name, overrides)
    print(f"# recipe {recipe.name}, composed and resolved")
    print(recipe.to_yaml(), end="")
    if backend == "cpu":
        return 0
    try:
        start = resolve_start(recipe)
        where = start.describe()
    except RecipeError as e:  # e.g. the start checkpoint is not there yet: show the mapping anyway
        start, where = StartPoint("fresh", load=recipe.checkpoint.dir), f"start undecided here: {e}"
    print(f"# Megatron-Bridge ConfigContainer, flattened ({where}); Bridge's defaults fill every other field")
    for key, value in container_view(recipe, start).items():
        shown = getattr(value, "__name__", repr(value)) if callable(value) else repr(value)  # F.silu -> silu
        print(f"{key}: {shown}")
    return 0


# ---------------------------------------------------------------------------------------------
# A command-line front end (the `prolong-nemo train` command is wired to `train_recipe`)
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m prolong_nemo.training.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--backend", choices=("auto", "bridge", "cpu"), default="auto")
    parser.add_argument("--synthetic-data", action="store_true", help="CPU runner: synthetic rows instead of MDS")
    parser.add_argument("--exit-after", type=int, default=None,
                        help="CPU runner: stop (and save) after N steps; refused with Megatron-Bridge")
    args = parser.parse_args(argv)
    try:
        return train_recipe(args.recipe, args.overrides, backend=args.backend, exit_after=args.exit_after,
                            synthetic_data=args.synthetic_data)
    except UserError as e:  # bad recipe, data, checkpoint or a held run lock: one line
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
