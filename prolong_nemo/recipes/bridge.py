"""Megatron-Bridge glue: dataset provider, recipe -> `ConfigContainer`, and the training main.

Runs inside an NGC NeMo container (Bridge >= 0.4; >= 0.5 for stage chaining), one process per
GPU under torchrun:

    torchrun --nproc-per-node 8 recipes/bridge_entry.py stage_512k optim.lr=1e-5

Bridge's package imports Transformer Engine, so this module only imports where TE works (a GPU
container); the plain-data half of the mapping is `bridge_spec.py`.

Tested against Bridge 0.5.0 (NGC NeMo 26.06) and 0.6.2 (tests/test_bridge_glue.py). What differs
for this glue: the dataset contracts moved from `training.config` to `data.base` in 0.6, and
0.5 never installs the SIGTERM trap of `train.exit_signal_handler` (`SignalTrapCallback` does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

try:  # Bridge >= 0.6 moved the dataset contracts to megatron.bridge.data.base
    from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider
except ImportError:  # Bridge 0.4 / 0.5: they live in training.config (0.6 re-exports them there)
    from megatron.bridge.training.config import DatasetBuildContext, DatasetProvider

from prolong_nemo.recipes.bridge_spec import (
    ProgressMeter,
    StartPoint,
    bridge_sections,
    build_prolong_datasets,
    dataset_fields,
    model_overrides,
    recorded_optimizer_lrs,
    resolve_start,
    schedule_of,
)
from prolong_nemo.recipes.config import RecipeConfig


@dataclass(kw_only=True)
class ProLongDatasetProvider(DatasetProvider):
    """ProLong's MDS domain mixture as packed THD rows (docs/batch-contract.md).

    Built on every rank; ranks of one data-parallel replica (TP / CP peers) read the same row,
    and the forward step partitions it per document for context parallelism.
    """

    domains: list[dict[str, Any]] = field(default_factory=list)  # [{"path", "proportion"}]
    seq_length: int = 65536
    seed: int = 42
    document_masking: bool = True
    instruction_masks: bool = False
    cp_size: int = 1
    tp_size: int = 1
    sequence_parallel: bool = False
    vocab_size: int = 128256
    cache_dir: str | None = None

    def build_datasets(self, context: DatasetBuildContext):
        train, valid, test = build_prolong_datasets(
            domains=self.domains, seq_length=self.seq_length, seed=self.seed,
            document_masking=self.document_masking, cp_size=self.cp_size, tp_size=self.tp_size,
            sequence_parallel=self.sequence_parallel, vocab_size=self.vocab_size, cache_dir=self.cache_dir,
            instruction_masks=self.instruction_masks, train_samples=context.train_samples,
            valid_samples=context.valid_samples, test_samples=context.test_samples)
        return train, valid, test


def build_model_provider(recipe: RecipeConfig):
    from prolong_nemo.model.megatron_config import ParallelSizes, RuntimeOptions, to_bridge_provider

    par = recipe.parallel
    provider = to_bridge_provider(
        recipe.arch, recipe.data.sequence_length,
        ParallelSizes(tp=par.tp, pp=par.pp, cp=par.cp, sequence_parallel=par.sequence_parallel),
        RuntimeOptions(params_dtype=torch.bfloat16, use_cpu_initialization=False, fusions=True,
                       recompute_layers=par.recompute == "full"),
    )
    for name, value in model_overrides(recipe).items():
        setattr(provider, name, value)
    return provider


def build_config_container(recipe: RecipeConfig, start: StartPoint | None = None):
    """The Megatron-Bridge `ConfigContainer` of a recipe (not yet validated: `pretrain` does it)."""
    from megatron.bridge.training import config as bc
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    start = start or resolve_start(recipe)
    s = bridge_sections(recipe, start)
    if start.kind == "chain":  # StageChainCallback applies this stage's LRs after the load
        s["optimizer"].update(recorded_optimizer_lrs(start.load))
    optimizer = bc.OptimizerConfig(**s["optimizer"], params_dtype=torch.bfloat16)
    # bf16 mixed precision; Bridge applies it to model, optimizer and DDP, so the recipe's
    # gradient-buffer dtype is set on it rather than on the DDP config alone.
    mixed_precision = get_mixed_precision_config("bf16_mixed")
    mixed_precision.grad_reduce_in_fp32 = recipe.parallel.grad_reduce_in_fp32
    return bc.ConfigContainer(
        train=bc.TrainingConfig(**s["train"]),
        validation=bc.ValidationConfig(**s["validation"]),  # Bridge's name (re-exported or subclassed)
        model=build_model_provider(recipe),
        optimizer=optimizer,
        ddp=bc.DistributedDataParallelConfig(**s["ddp"]),
        scheduler=bc.SchedulerConfig(**s["scheduler"]),
        dataset=ProLongDatasetProvider(**dataset_fields(recipe)),
        logger=bc.LoggerConfig(**s["logger"]),
        tokenizer=bc.TokenizerConfig(**s["tokenizer"]),
        checkpoint=bc.CheckpointConfig(**s["checkpoint"]),
        rng=bc.RNGConfig(**s["rng"]),
        mixed_precision=mixed_precision,
    )


def bridge_version() -> tuple[int, ...]:
    from prolong_nemo.recipes.plan import _dist_version, parse_version

    text = _dist_version("megatron-bridge", "megatron_bridge")
    if text is None:  # a source install without distribution metadata
        from megatron.bridge.package_info import __version__ as text
    return parse_version(text) or (0,)


# First Bridge release whose GlobalState installs the SIGTERM trap of `exit_signal_handler`.
BRIDGE_INSTALLS_SIGNAL_TRAP = (0, 6)


def callbacks_for(recipe: RecipeConfig, start: StartPoint, log=print) -> list:
    from prolong_nemo.recipes.bridge_callbacks import (
        ModelRecordCallback,
        ProgressLogCallback,
        SignalTrapCallback,
        StageChainCallback,
    )
    from prolong_nemo.recipes.plan import MIN_BRIDGE_CHAIN

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
    from prolong_nemo.training.forward_step import StepOptions, make_forward_step

    start = resolve_start(recipe)
    opened = start.pretrained if start.kind == "weights" else start.load if start.kind != "fresh" else None
    if opened is not None:  # Bridge unpickles .metadata / *.pt with plain pickle: check them first
        from prolong_nemo.convert import ConversionError
        from prolong_nemo.convert.megatron_io import check_checkpoint

        try:
            check_checkpoint(opened, strict=True)
        except ConversionError as e:
            raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[prolong] {recipe.name}: {start.describe()}", flush=True)
    cfg = build_config_container(recipe, start)
    # Our forward step receives whole packed rows and partitions them per document for CP.
    forward_step = make_forward_step(StepOptions(recipe.loss.impl, recipe.loss.chunk_tokens, partition_for_cp=True))
    pretrain(cfg, forward_step, callbacks=callbacks_for(recipe, start))
    return 0
