"""Megatron-Bridge backend, entry: one rank of a training job runs `main` (Bridge `pretrain`).

    torchrun --nproc-per-node 8 recipes/bridge_entry.py stage_512k optim.lr=1e-5

Holds the run lock, checks the start checkpoint, builds the `ConfigContainer` (`config.py`),
the callbacks (`callbacks.py`) and our forward step, and calls `pretrain(cfg, forward_step)`.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.training.bridge.config import BRIDGE_INSTALLS_SIGNAL_TRAP, bridge_version, build_config_container
from prolong_nemo.training.progress import ProgressMeter
from prolong_nemo.training.schedule import schedule_of
from prolong_nemo.training.start import StartPoint, check_start


def callbacks_for(recipe: RecipeConfig, start: StartPoint, log=print) -> list:
    from prolong_nemo.recipes.plan import MIN_BRIDGE_CHAIN
    from prolong_nemo.training.bridge.callbacks import (
        ModelRecordCallback,
        ProgressLogCallback,
        SignalTrapCallback,
        StageChainCallback,
    )

    callbacks: list = []
    if bridge_version() < BRIDGE_INSTALLS_SIGNAL_TRAP:  # save on SIGTERM (bridge_sections sets exit_signal_handler)
        callbacks.append(SignalTrapCallback())
    # architecture + bos/eos ids of the start model in every checkpoint, for the HF export
    callbacks.append(ModelRecordCallback.for_start(recipe, start, log=log))
    if start.kind == "chain":
        if bridge_version() < MIN_BRIDGE_CHAIN:
            raise RuntimeError(
                f"chaining {recipe.name} from {start.load} needs Megatron-Bridge >= "
                f"{'.'.join(map(str, MIN_BRIDGE_CHAIN))} (on_data_init_start); use NGC NeMo 26.06 or newer")
        # Bridge's scheduler counts samples: warmup and decay are iterations x global batch.
        schedule = schedule_of(recipe, increment=recipe.train.global_batch_size)
        callbacks.append(StageChainCallback(start.load, schedule, log=log))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(
        os.environ.get("WORLD_SIZE", recipe.cluster.world_size))
    callbacks.append(ProgressLogCallback(ProgressMeter.for_recipe(recipe, world), recipe.logging.log_interval, log=log))
    return callbacks


def main(argv: Sequence[str]) -> int:
    """`bridge_entry.py <recipe> [overrides]`: one rank of a Megatron-Bridge training job."""
    from megatron.bridge.training.pretrain import pretrain

    from prolong_nemo.recipes.stages import load_recipe

    if not argv:
        raise SystemExit("usage: bridge_entry.py <recipe> [hydra overrides]")
    recipe = load_recipe(argv[0], list(argv[1:]))
    from prolong_nemo.training.run_lock import RunLockError, run_lock

    # One run per checkpoint dir, held from before the start is resolved until pretrain returns;
    # ranks agree through the lock record (the process group does not exist yet).
    try:
        with run_lock(recipe.checkpoint.dir):
            return _run(recipe, pretrain)
    except RunLockError as e:
        raise SystemExit(f"error: {e}") from None


def _run(recipe: RecipeConfig, pretrain) -> int:
    from prolong_nemo.training.forward_step import make_forward_step
    from prolong_nemo.training.run import Run

    try:
        run = Run.of(recipe)
        check_start(recipe, run.start, strict=True)  # Bridge unpickles .metadata / *.pt with plain pickle
    except RecipeError as e:
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[prolong] {recipe.name}: {run.start.describe()}", flush=True)
    cfg = build_config_container(recipe, run.start)
    pretrain(cfg, make_forward_step(run.step), callbacks=callbacks_for(recipe, run.start))
    return 0
