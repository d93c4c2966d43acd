"""One run, described once from a recipe for every backend: where it starts and how a step runs.

Built after the run lock is held (the start is read from the checkpoint directory), on every
rank alike; `bridge.main` and `cpu.main` each check the start checkpoint (`start.check_start`,
`start.check_start_architecture`) and turn the run into their own loop's settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from prolong_nemo.recipes.config import RecipeConfig
from prolong_nemo.training.forward_step import StepOptions
from prolong_nemo.training.start import StartPoint, resolve_start


@dataclass(frozen=True)
class Run:
    recipe: RecipeConfig
    start: StartPoint
    # Whole packed rows reach the forward step, which partitions them per document for CP.
    step: StepOptions

    @classmethod
    def of(cls, recipe: RecipeConfig) -> "Run":
        return cls(recipe, resolve_start(recipe),
                   StepOptions(recipe.loss.impl, recipe.loss.chunk_tokens, partition_for_cp=True))
