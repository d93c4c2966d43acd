"""A stage's LR schedule in megatron's units, and putting a loaded scheduler back at step 0.

Shared by the Bridge backend (`StageChainCallback`) and the CPU backend (`cpu.main.apply_start`).
"""

from __future__ import annotations

from typing import Any

from prolong_nemo.recipes.config import RecipeConfig


def restart_schedule(scheduler: Any, optimizer: Any, *, max_lr: float, min_lr: float, warmup_steps: int,
                     decay_steps: int) -> None:
    """Put a megatron `OptimizerParamScheduler` back at step 0 with this stage's schedule.

    Loading the previous stage brings back its scheduler state (step count, and with
    `use_checkpoint_opt_param_scheduler` its LRs and lengths) and its optimizer param groups,
    whose `max_lr` / `min_lr` override the scheduler's (megatron reads them per group): all
    are replaced by this stage's values. Adam's moments and per-parameter step counters are
    kept, as in the reference (it links the previous optimizer file).
    """
    scheduler.max_lr, scheduler.min_lr = float(max_lr), float(min_lr)
    scheduler.lr_warmup_steps, scheduler.lr_decay_steps = int(warmup_steps), int(decay_steps)
    scheduler.num_steps = 0
    for group in optimizer.param_groups:
        group["max_lr"] = scheduler.max_lr
        group["min_lr"] = scheduler.min_lr
    scheduler.step(0)  # writes lr (= warmup start) and weight decay into every group


def schedule_of(recipe: RecipeConfig, *, increment: int) -> dict[str, float | int]:
    """`restart_schedule` keyword arguments of a recipe, in the scheduler's own units.

    `increment`: how far the scheduler advances per optimizer step. Megatron-Bridge (like
    Megatron-LM) counts samples: it calls `scheduler.step(global_batch_size)` every iteration
    and sizes warmup and decay as iterations x global batch (`ConfigContainer._calculate_scheduler_steps`),
    so the Bridge path passes `recipe.train.global_batch_size`; the CPU runner steps by 1.
    """
    if increment < 1:
        raise ValueError(f"increment must be >= 1, got {increment}")
    return dict(max_lr=recipe.optim.lr, min_lr=recipe.optim.min_lr, warmup_steps=recipe.warmup_steps * increment,
                decay_steps=recipe.train.steps * increment)
