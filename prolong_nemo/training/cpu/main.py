"""CPU backend, entry: train a (small) recipe with the megatron-core loop of `runner.py`.

Same start points (resume / chain / weights / fresh, `training.start`), schedule restart
(`training.schedule`) and progress line (`training.progress`) as the Bridge backend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.recipes.stages import CPU_RECIPES, load_recipe
from prolong_nemo.training.cpu.config import cpu_dataset, cpu_train_config
from prolong_nemo.training.data import build_prolong_datasets
from prolong_nemo.training.progress import ProgressMeter
from prolong_nemo.training.run import Run
from prolong_nemo.training.schedule import restart_schedule, schedule_of
from prolong_nemo.training.start import StartPoint, check_start_architecture


def load_weights(root: str, model, log: Callable[[str], None] | None = None) -> Path:
    """Model weights only from a Megatron checkpoint root (`latest_checkpointed_iteration.txt`);
    returns the iteration folder read."""
    from megatron.core import dist_checkpointing

    from prolong_nemo.convert.megatron_io import check_checkpoint
    from prolong_nemo.training.cpu.runner import load_model_state

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
    from prolong_nemo.training.cpu.runner import load_checkpoint

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
        from prolong_nemo.training.cpu.runner import recorded_hf_extras

        state.hf_extras = recorded_hf_extras(load_weights(start.pretrained, state.model, log))
    log(f"[prolong] {start.describe()}" + (f" at step {state.step}" if start.kind == "resume" else ""))


def run_cpu(recipe: RecipeConfig, *, log: Callable[[str], None] = print, exit_after: int | None = None,
            synthetic_data: bool = False):
    """Train a (small) recipe on CPU; returns the CPU runner's final state.

    `exit_after`: save and stop after that many steps (resubmitting continues).
    """
    import torch.distributed as dist

    from prolong_nemo.data.dataset import collate
    from prolong_nemo.training.cpu import runner as cpu_runner

    if recipe.parallel.model_parallel != 1:
        raise RecipeError(f"{recipe.name}: the CPU runner trains with tp = pp = cp = 1, got {recipe.parallel}")
    cpu_runner.init_distributed(seed=recipe.train.seed)  # first: the data-parallel size sizes the balancing
    dataset = cpu_dataset(recipe, synthetic_data)
    cfg = cpu_train_config(recipe, dp=dist.get_world_size(), exit_after=exit_after)
    meter = ProgressMeter.for_recipe(recipe, world_size=dist.get_world_size())

    def start(state) -> None:
        for group in state.optimizer.param_groups:
            group["eps"] = recipe.optim.adam_eps
        start = Run.of(recipe).start  # under the run lock train() holds
        check_start_architecture(recipe, start)  # the loaders check the files themselves
        apply_start(start, state, recipe, log)

    def log_line(record, state, _elapsed, _done) -> str:
        return "[prolong] " + meter.line(record.step, record.loss, record.seconds, cpu_runner.peak_rss_bytes(),
                                         lr=state.optimizer.param_groups[0]["lr"], now=time.perf_counter(),
                                         tokens=record.tokens)

    return cpu_runner.train(cfg, dataset, collate, log, start=start, log_line=log_line)


def cpu_recipe_name(name: str) -> str:
    """The CPU miniature of a full-size stage (a CPU recipe or a YAML path is used as is)."""
    return CPU_RECIPES.get(name, name)


def run_recipe(recipe_name: str, overrides: list[str], *, log: Callable[[str], None], exit_after: int | None,
               synthetic_data: bool) -> int:
    name = cpu_recipe_name(recipe_name)
    if name != recipe_name:
        log(f"[prolong] CPU backend: training {name}, the CPU miniature of {recipe_name}")
    run_cpu(load_recipe(name, overrides), log=log, exit_after=exit_after, synthetic_data=synthetic_data)
    return 0


def flag_dataset(cfg, data: str, row_tokens: int):
    """The rows of `prolong-nemo train` in flag mode (no recipe): synthetic arithmetic
    documents, or a folder of packed ProLong MDS samples through the data adapter."""
    from prolong_nemo.model.config import preset

    vocab = preset(cfg.preset).vocab_size
    if data == "synthetic":
        from prolong_nemo.training.synthetic import ArithmeticDocuments

        if row_tokens > cfg.seq_length:
            raise SystemExit(f"--row-tokens {row_tokens} exceeds --seq-length {cfg.seq_length}")
        return ArithmeticDocuments(vocab_size=vocab, row_tokens=row_tokens, seed=cfg.seed, cp_size=cfg.cp)
    import torch.distributed as dist

    from prolong_nemo.training.cpu import runner as cpu_runner

    cpu_runner.init_distributed(cp=cfg.cp, seed=cfg.seed)  # the data-parallel size sizes the dataset
    dp = dist.get_world_size() // cfg.cp
    train, _, _ = build_prolong_datasets(
        domains=[{"path": data, "proportion": 1.0}], seq_length=cfg.seq_length, seed=cfg.seed,
        document_masking=True, cp_size=cfg.cp, tp_size=1, sequence_parallel=False, vocab_size=vocab,
        cache_dir=None, train_samples=cfg.train_iters * cfg.micro_batches * dp)
    return train


def run_flags(cfg, *, data: str, row_tokens: int) -> int:
    """The CPU runner driven by `prolong-nemo train` flags (no recipe)."""
    from prolong_nemo.data.dataset import collate
    from prolong_nemo.training.cpu.runner import train

    train(cfg, flag_dataset(cfg, data, row_tokens), collate, log=lambda line: print(line, flush=True))
    return 0
