"""`prolong-nemo train <recipe> [overrides]`: run a recipe where this machine can.

- GPU + Megatron-Bridge (NGC NeMo container): under torchrun, every rank runs
  `bridge.main` (Bridge `pretrain(cfg, forward_step)`); started outside torchrun, this
  re-executes itself as `torchrun --nproc-per-node <gpus_per_node> recipes/bridge_entry.py ...`
  (one node; use `prolong-nemo launch` for Slurm / several nodes), with the same job
  environment as `launch` (`CUDA_DEVICE_MAX_CONNECTIONS=1` unless already set, `cluster.env`).
- Otherwise the CPU runner (megatron-core on gloo) trains the stage's CPU miniature
  (`<recipe>_cpu`: same schedule shape, tiny model), with the same resume, stage-chaining and
  progress-log logic as the Bridge path.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

from prolong_nemo.errors import UserError
from prolong_nemo.recipes.bridge_spec import (
    ProgressMeter,
    StartPoint,
    build_prolong_datasets,
    dataset_fields,
    resolve_start,
    restart_schedule,
    schedule_of,
)
from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.recipes.stages import CPU_RECIPES, load_recipe, recipes_dir

Backend = Literal["auto", "bridge", "cpu"]


def bridge_available() -> bool:
    """Megatron-Bridge installed and a GPU visible (Bridge imports Transformer Engine)."""
    import torch

    return importlib.util.find_spec("megatron.bridge") is not None and torch.cuda.is_available()


def select_backend(requested: Backend = "auto") -> Literal["bridge", "cpu"]:
    if requested == "auto":
        return "bridge" if bridge_available() else "cpu"
    if requested == "bridge" and not bridge_available():
        raise RecipeError("the bridge backend needs a GPU and Megatron-Bridge (an NGC NeMo container)")
    return requested


def cpu_recipe_name(name: str) -> str:
    """The CPU miniature of a full-size stage (a CPU recipe or a YAML path is used as is)."""
    return CPU_RECIPES.get(name, name)


def entry_script() -> Path:
    return recipes_dir() / "bridge_entry.py"


def torchrun_command(recipe: RecipeConfig, recipe_name: str, overrides: Sequence[str]) -> list[str]:
    if recipe.cluster.nodes != 1:
        raise RecipeError(f"{recipe.name} asks for {recipe.cluster.nodes} nodes: submit it with `prolong-nemo launch`")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={recipe.cluster.gpus_per_node}", str(entry_script()), recipe_name, *overrides]


def train_recipe(recipe_name: str, overrides: Sequence[str] = (), *, backend: Backend = "auto",
                 log: Callable[[str], None] = print, exit_after: int | None = None,
                 synthetic_data: bool = False) -> int:
    """Train `recipe_name` with Hydra `overrides`; returns a process exit code."""
    overrides = list(overrides)
    if select_backend(backend) == "bridge":
        if exit_after is not None:
            # It was ignored here. Bridge's nearest settings stop elsewhere: train.exit_interval
            # at the first step divisible by N (not N steps after a resume), exit_duration_in_mins
            # after a wall time; train.steps would change the LR schedule.
            raise RecipeError("--exit-after is not supported with Megatron-Bridge (no Bridge setting stops "
                              "N steps into a run); use --backend cpu for stop-and-resume drills")
        if "LOCAL_RANK" in os.environ:  # already one rank of a torchrun job
            from prolong_nemo.recipes.bridge import main

            return main([recipe_name, *overrides])
        from prolong_nemo.recipes.launch import job_environment

        recipe = load_recipe(recipe_name, overrides)
        cmd = torchrun_command(recipe, recipe_name, overrides)
        log("[prolong] " + " ".join(cmd))
        return subprocess.run(cmd, check=False, env=job_environment(recipe, os.environ)).returncode

    name = cpu_recipe_name(recipe_name)
    if name != recipe_name:
        log(f"[prolong] no GPU / Megatron-Bridge here: training {name}, the CPU miniature of {recipe_name}")
    recipe = load_recipe(name, overrides)
    run_cpu(recipe, log=log, exit_after=exit_after, synthetic_data=synthetic_data)
    return 0


# ---------------------------------------------------------------------------------------------
# CPU runner path
# ---------------------------------------------------------------------------------------------
def cpu_train_config(recipe: RecipeConfig, dp: int = 1, exit_after: int | None = None):
    from prolong_nemo.training.cpu_runner import TrainConfig

    if recipe.train.global_batch_size % dp:
        raise RecipeError(f"global batch {recipe.train.global_batch_size} not divisible by {dp} CPU ranks")
    o = recipe.optim
    return TrainConfig(
        preset=recipe.model.preset, rope_theta=recipe.model.rope_theta, seq_length=recipe.data.sequence_length,
        train_iters=recipe.train.steps, micro_batches=recipe.train.global_batch_size // dp, lr=o.lr,
        min_lr=o.min_lr, warmup_iters=recipe.warmup_steps, weight_decay=o.weight_decay,
        adam_betas=(o.adam_beta1, o.adam_beta2), clip_grad=o.clip_grad, loss_impl=recipe.loss.impl,
        chunk_tokens=recipe.loss.chunk_tokens, save_dir=recipe.checkpoint.dir,
        save_interval=recipe.checkpoint.save_interval, stop_after=exit_after,
        log_interval=recipe.logging.log_interval, seed=recipe.train.seed,
    )


def cpu_dataset(recipe: RecipeConfig, synthetic: bool = False):
    """The recipe's MDS mixture through the data adapter (or synthetic rows for a quick demo)."""
    if synthetic:
        from prolong_nemo.training.synthetic import ArithmeticDocuments

        return ArithmeticDocuments(vocab_size=recipe.arch.vocab_size, row_tokens=recipe.data.sequence_length,
                                   seed=recipe.data.seed, cp_size=recipe.parallel.cp)
    missing = [p for p, _ in recipe.data.domain_paths() if "://" not in p and not os.path.isdir(p)]
    if missing:
        raise RecipeError(f"{recipe.name}: data domains not found: {missing} (set data.root or PROLONG_DATA_CPU)")
    f = dataset_fields(recipe)
    train, _, _ = build_prolong_datasets(
        domains=f["domains"], seq_length=f["seq_length"], seed=f["seed"], document_masking=f["document_masking"],
        cp_size=f["cp_size"], tp_size=f["tp_size"], sequence_parallel=f["sequence_parallel"],
        vocab_size=f["vocab_size"], cache_dir=f["cache_dir"], instruction_masks=f["instruction_masks"],
        train_samples=recipe.train.steps * recipe.train.global_batch_size)
    return train


def load_weights(root: str, model, log: Callable[[str], None] | None = None) -> Path:
    """Model weights only from a Megatron checkpoint root (`latest_checkpointed_iteration.txt`);
    returns the iteration folder read."""
    from megatron.core import dist_checkpointing

    from prolong_nemo.convert.megatron_io import check_checkpoint
    from prolong_nemo.training.cpu_runner import load_model_state

    path = check_checkpoint(Path(root), log)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    load_model_state(model, loaded["model"], path)
    return path


def apply_start(start: StartPoint, state, recipe: RecipeConfig, log: Callable[[str], None]) -> None:
    """Resume / chain / weights-only start of the CPU runner's state (mirrors the Bridge path)."""
    from prolong_nemo.convert.mapping import ConversionError

    try:
        _apply_start(start, state, recipe, log)
    except ConversionError as e:  # a damaged or unsafe checkpoint, named
        raise RecipeError(str(e)) from None


def _apply_start(start: StartPoint, state, recipe: RecipeConfig, log: Callable[[str], None]) -> None:
    from prolong_nemo.training.cpu_runner import load_checkpoint

    if start.kind == "resume":
        load_checkpoint(start.load, state, log)
    elif start.kind == "chain":
        load_checkpoint(start.load, state, log)
        previous = state.step
        state.step, state.consumed_samples = 0, 0
        restart_schedule(state.scheduler, state.optimizer, **schedule_of(recipe, increment=1))  # steps by 1
        log(f"[prolong] loaded {start.load} at its step {previous}: weights and Adam state kept, "
            "step, consumed samples and LR schedule restarted at 0")
        return
    elif start.kind == "weights":
        from prolong_nemo.training.cpu_runner import recorded_hf_extras

        state.hf_extras = recorded_hf_extras(load_weights(start.pretrained, state.model, log))
    log(f"[prolong] {start.describe()}" + (f" at step {state.step}" if start.kind == "resume" else ""))


def _peak_rss_bytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def run_cpu(recipe: RecipeConfig, *, log: Callable[[str], None] = print, exit_after: int | None = None,
            synthetic_data: bool = False):
    """Train a (small) recipe on CPU; returns the CPU runner's final state.

    `exit_after`: save and stop after that many steps (resubmitting continues).
    """
    import torch.distributed as dist

    from prolong_nemo.data.dataset import collate
    from prolong_nemo.training import cpu_runner

    if recipe.parallel.model_parallel != 1:
        raise RecipeError(f"{recipe.name}: the CPU runner trains with tp = pp = cp = 1, got {recipe.parallel}")
    dataset = cpu_dataset(recipe, synthetic_data)
    cpu_runner.init_distributed(seed=recipe.train.seed)
    cfg = cpu_train_config(recipe, dp=dist.get_world_size(), exit_after=exit_after)
    meter = ProgressMeter.for_recipe(recipe, world_size=dist.get_world_size())

    def start(state) -> None:
        for group in state.optimizer.param_groups:
            group["eps"] = recipe.optim.adam_eps
        apply_start(resolve_start(recipe), state, recipe, log)

    def log_line(record, state, _elapsed, _done) -> str:
        return "[prolong] " + meter.line(record.step, record.loss, record.seconds, _peak_rss_bytes(),
                                         lr=state.optimizer.param_groups[0]["lr"], now=time.perf_counter())

    return cpu_runner.train(cfg, dataset, collate, log, start=start, log_line=log_line)


# ---------------------------------------------------------------------------------------------
# A command-line front end (the `prolong-nemo train` command is wired to `train_recipe`)
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m prolong_nemo.recipes.entry", description=__doc__.splitlines()[0])
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
