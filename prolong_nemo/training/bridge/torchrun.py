"""Megatron-Bridge backend, start: `prolong-nemo train <recipe>` on a GPU node.

Outside torchrun this re-executes as `torchrun --nproc-per-node <gpus_per_node>
recipes/bridge_entry.py <recipe> <overrides>` on this one node (several nodes: `prolong-nemo
launch`), with the job environment `launch` gives its ranks; inside torchrun (a rank) it runs
`main.main` directly. Bridge itself is imported only by the ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.recipes.stages import load_recipe, recipes_dir


def entry_script() -> Path:
    return recipes_dir() / "bridge_entry.py"


def torchrun_command(recipe: RecipeConfig, recipe_name: str, overrides: Sequence[str]) -> list[str]:
    if recipe.cluster.nodes != 1:
        raise RecipeError(f"{recipe.name} asks for {recipe.cluster.nodes} nodes: submit it with `prolong-nemo launch`")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={recipe.cluster.gpus_per_node}", str(entry_script()), recipe_name, *overrides]


def run_recipe(recipe_name: str, overrides: list[str], *, log: Callable[[str], None], exit_after: int | None,
               synthetic_data: bool) -> int:
    if exit_after is not None:
        # Bridge's nearest settings stop elsewhere: train.exit_interval at the first step
        # divisible by N (not N steps after a resume), exit_duration_in_mins after a wall time;
        # train.steps would change the LR schedule.
        raise RecipeError("--exit-after is not supported with Megatron-Bridge (no Bridge setting stops "
                          "N steps into a run); use --backend cpu for stop-and-resume drills")
    if synthetic_data:
        raise RecipeError("--synthetic-data is a CPU-runner option (--backend cpu); Megatron-Bridge trains "
                          "the recipe's data.mixture")
    if "LOCAL_RANK" in os.environ:  # already one rank of a torchrun job
        from prolong_nemo.training.bridge.main import main

        return main([recipe_name, *overrides])
    from prolong_nemo.recipes.launch import job_environment

    recipe = load_recipe(recipe_name, overrides)
    cmd = torchrun_command(recipe, recipe_name, overrides)
    log("[prolong] " + " ".join(cmd))
    return subprocess.run(cmd, check=False, env=job_environment(recipe, os.environ)).returncode
