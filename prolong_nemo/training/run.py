"""One run, described once from a recipe for every backend: where it starts, how a step runs,
and its schedule.

Built after the run lock is held (the start is read from the checkpoint directory), on every
rank alike; `bridge.main` and `cpu.main` each turn it into their own loop's settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from prolong_nemo.recipes.config import RecipeConfig
from prolong_nemo.training.forward_step import StepOptions
from prolong_nemo.training.schedule import schedule_of
from prolong_nemo.training.start import StartPoint, check_start, resolve_start


@dataclass(frozen=True)
class Run:
    recipe: RecipeConfig
    start: StartPoint
    # Whole packed rows reach the forward step, which partitions them per document for CP.
    step: StepOptions

    @classmethod
    def of(cls, recipe: RecipeConfig, *, strict: bool = False, log=None) -> "Run":
        """The recipe's run, its start checkpoint checked (`start.check_start`) before any load."""
        start = resolve_start(recipe)
        check_start(recipe, start, strict=strict, log=log)
        return cls(recipe, start, StepOptions(recipe.loss.impl, recipe.loss.chunk_tokens, partition_for_cp=True))

    def schedule(self, *, increment: int) -> dict[str, float | int]:
        """`restart_schedule` arguments in the backend's scheduler units (see `schedule_of`)."""
        return schedule_of(self.recipe, increment=increment)
