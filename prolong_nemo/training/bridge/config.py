"""Megatron-Bridge backend, configuration: the dataset provider and recipe -> `ConfigContainer`.

Runs inside an NGC NeMo container (Bridge >= 0.4; >= 0.5 for stage chaining). Bridge's package
imports Transformer Engine, so this module only imports where TE works (a GPU container); the
plain-data half of the mapping is `sections.py`.

Tested against Bridge 0.5.0 (NGC NeMo 26.06) and 0.6.2 (tests/test_bridge_glue.py). What differs
for this glue: the dataset contracts moved from `training.config` to `data.base` in 0.6, and
0.5 never installs the SIGTERM trap of `train.exit_signal_handler` (`SignalTrapCallback` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

try:  # Bridge >= 0.6 moved the dataset contracts to megatron.bridge.data.base
    from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider
except ImportError:  # Bridge 0.4 / 0.5: they live in training.config (0.6 re-exports them there)
    from megatron.bridge.training.config import DatasetBuildContext, DatasetProvider

from prolong_nemo.recipes.config import RecipeConfig
from prolong_nemo.training.bridge.sections import (
    apply_bridge_overrides,
    bridge_sections,
    model_overrides,
    model_provider_inputs,
)
from prolong_nemo.training.data import build_prolong_datasets, dataset_fields
from prolong_nemo.training.start import StartPoint, recorded_optimizer_lrs, resolve_start


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
    balance: bool = False  # cost-balance each global batch over the data-parallel ranks
    global_batch_size: int = 1
    preset: str = "llama3-8b"  # the cost model's architecture (model.preset)

    def build_datasets(self, context: DatasetBuildContext):
        from megatron.core import parallel_state

        train, valid, test = build_prolong_datasets(
            domains=self.domains, seq_length=self.seq_length, seed=self.seed,
            document_masking=self.document_masking, cp_size=self.cp_size, tp_size=self.tp_size,
            sequence_parallel=self.sequence_parallel, vocab_size=self.vocab_size, cache_dir=self.cache_dir,
            instruction_masks=self.instruction_masks, train_samples=context.train_samples,
            valid_samples=context.valid_samples, test_samples=context.test_samples, balance=self.balance,
            global_batch_size=self.global_batch_size, preset=self.preset,
            # the ranks that read different samples (TP / CP peers read the same row)
            dp_size=parallel_state.get_data_parallel_world_size())
        return train, valid, test


def build_model_provider(recipe: RecipeConfig):
    from prolong_nemo.model.megatron_config import to_bridge_provider

    provider = to_bridge_provider(*model_provider_inputs(recipe))
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
    container = bc.ConfigContainer(
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
    apply_bridge_overrides(container, recipe.bridge)  # the user's bridge.* fields, last
    return container


def bridge_version() -> tuple[int, ...]:
    from prolong_nemo.recipes.plan import _dist_version, parse_version

    text = _dist_version("megatron-bridge", "megatron_bridge")
    if text is None:  # a source install without distribution metadata
        from megatron.bridge.package_info import __version__ as text
    return parse_version(text) or (0,)


# First Bridge release whose GlobalState installs the SIGTERM trap of `exit_signal_handler`.
BRIDGE_INSTALLS_SIGNAL_TRAP = (0, 6)
