"""Typed recipe configuration: what a ProLong stage is, independent of how it is launched.

The YAML files in `recipes/` are the readable form. These dataclasses are their Hydra
structured-config schema (registered in Hydra's ConfigStore by `stages.py`), so OmegaConf checks
every key and type while the YAMLs and overrides are composed (`parallel.tp=two` is refused
naming the key) and builds the `RecipeConfig` itself; `problems()` then checks what types cannot
say (ranges, choices, divisibility). No torch, megatron or Bridge import here: `plan`, `launch`
and tests read recipes anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import MISSING

from prolong_nemo.data.mixture import Mixture
from prolong_nemo.errors import DataError, UserError
from prolong_nemo.model.config import LlamaArch, preset

STAGES: tuple[str, ...] = ("64k", "512k", "sft")
INIT_MODES: tuple[str, ...] = ("none", "weights", "weights_and_optimizer")
LOSS_IMPLS: tuple[str, ...] = ("chunked", "fused")
RECOMPUTE: tuple[str, ...] = ("full", "selective", "none")


class RecipeError(UserError):
    """A recipe that cannot run; the message says why (the CLI prints it without a traceback)."""


def config_error(error: BaseException) -> str:
    """One line for a Hydra / OmegaConf error: the key it names, then the library's reason."""
    cause = error
    while cause.__cause__ is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    text = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()
    reason = text[0] if text else type(cause).__name__
    override = re.match(r"Error merging override [+~]*([^=\s]+)=", str(error))
    if override and key and override.group(1) != key:
        key = f"{override.group(1)}: {key}"  # a key inside the list or dict the override set
    return f"{key}: {reason}" if key else " ".join(str(error).split())


@dataclass
class ModelConfig:
    preset: str = "llama3-8b"
    rope_theta: float = 500_000.0

    def arch(self) -> LlamaArch:
        return preset(self.preset, rope_theta=float(self.rope_theta))


@dataclass
class DomainConfig:
    path: str = MISSING
    proportion: float = MISSING


@dataclass
class DataConfig:
    root: str = MISSING
    mixture: list[DomainConfig] = MISSING
    sequence_length: int = MISSING
    document_masking: bool = True
    instruction_masks: bool = False
    seed: int = 42
    num_workers: int = 2
    cache_dir: str | None = None
    # Spread each global batch over the data-parallel ranks by attention-aware cost (sum of
    # dense + l^2 terms), so no rank waits on the others (data/balance.py); the samples of a
    # step, and so its loss, are unchanged. No effect at dp = 1.
    balance: bool = True

    def domain_paths(self) -> list[tuple[str, float]]:
        """(absolute-or-remote path, proportion) per domain, relative paths joined to `root`."""
        out = []
        for d in self.mixture:
            remote = "://" in d.path
            path = d.path if (remote or os.path.isabs(d.path)) else os.path.join(self.root, d.path)
            out.append((path, float(d.proportion)))
        return out


@dataclass
class TrainConfig:
    steps: int = MISSING
    global_batch_size: int = MISSING
    micro_batch_size: int = 1
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = MISSING
    warmup_fraction: float = MISSING
    min_lr_ratio: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    def warmup_steps(self, steps: int) -> int:
        # Hugging Face rounds warmup up (ceil(250 * 0.05) = 13 in the SFT reference).
        return math.ceil(steps * self.warmup_fraction - 1e-9)


@dataclass
class LossConfig:
    per_token: bool = True
    impl: str = "chunked"
    chunk_tokens: int = 2048


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    grad_reduce_in_fp32: bool = True
    recompute: str = "full"
    recompute_num_layers: int = 1

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp


@dataclass
class CheckpointConfig:
    dir: str = MISSING
    save_interval: int = 125
    init_from: str | None = None
    init: str = "none"
    format: str = "torch_dist"
    # Distributed-optimizer state format of this stage's saves (`optim_checkpoint_format`):
    # "auto", True (fully reshardable: any layout loads it, every save and load gathers the
    # whole Adam state into host memory) or False (DP-reshardable: same tp and pp only).
    optim_reshardable: bool | str = "auto"
    # The recipe that loads this stage's Adam state (checkpoint.init=weights_and_optimizer).
    optim_read_by: str | None = None


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: str | None = None
    wandb_project: str | None = None


@dataclass
class SlurmConfig:
    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"
    job_name_prefix: str = "prolong-"


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    gpu_arch: str = "hopper"
    container_image: str | None = None  # the image the Dockerfile builds (required by launch on Slurm)
    mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class BridgeOverrides:
    """`bridge.<section>.<field>=value`: per Megatron-Bridge ConfigContainer section, the
    fields to set after the recipe's own mapping (the sections are declared so that Hydra
    accepts a new field in them without `+`)."""

    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    ddp: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    mixed_precision: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    dist: dict[str, Any] = field(default_factory=dict)
    profiling: dict[str, Any] = field(default_factory=dict)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """(section, fields) for every section that sets something."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name)]


@dataclass
class RecipeConfig:
    # MISSING ("???"): the stage YAMLs must set it (OmegaConf refuses a recipe that does not).
    name: str = MISSING
    stage: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Megatron-Bridge fields this schema does not model, set on the ConfigContainer after the
    # recipe's own mapping: `bridge.<section>.<field>=value` (e.g. bridge.ddp.bucket_size=1e8,
    # bridge.checkpoint.async_save=true, bridge.model.attention_backend=fused). Checked against
    # Bridge's own dataclass fields when the job builds its ConfigContainer.
    bridge: BridgeOverrides = field(default_factory=BridgeOverrides)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def arch(self) -> LlamaArch:
        return self.model.arch()

    @property
    def data_parallel_size(self) -> int:
        return self.cluster.world_size // self.parallel.model_parallel

    @property
    def warmup_steps(self) -> int:
        return self.optim.warmup_steps(self.train.steps)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.sequence_length

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.train.steps

    @property
    def grad_accumulation(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * max(self.data_parallel_size, 1))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RecipeConfig":
        """From a plain mapping (e.g. `to_dict()`'s), typed and checked by OmegaConf against this schema."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), raw))
        except OmegaConfBaseException as e:
            raise RecipeError(f"invalid recipe: {config_error(e)}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The recipe as YAML (OmegaConf's rendering of the schema's values)."""
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.structured(self))

    # ---- validation ---------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason this recipe cannot run as configured (empty when it is valid)."""
        p: list[str] = []
        if self.stage not in STAGES:
            p.append(f"stage must be one of {STAGES}, got {self.stage!r}")
        try:
            arch = self.arch
        except ValueError as e:
            return p + [str(e)]

        d, t, o, par, ck = self.data, self.train, self.optim, self.parallel, self.checkpoint
        if d.sequence_length <= 0:
            p.append(f"data.sequence_length must be positive, got {d.sequence_length}")
        try:  # the one proportion rule of a written mixture (`data inspect` applies it too)
            Mixture.checked(d.domain_paths(), what="data.mixture")
        except DataError as e:
            p.append(f"data.mixture: {e}" if not str(e).startswith("data.mixture") else str(e))
        if self.stage == "sft" and not d.instruction_masks:
            p.append("SFT trains on assistant tokens only: data.instruction_masks must be true")

        if t.steps <= 0:
            p.append(f"train.steps must be positive, got {t.steps}")
        if t.micro_batch_size != 1:
            p.append(f"train.micro_batch_size must be 1 (one packed THD sequence per GPU), got {t.micro_batch_size}")
        if t.global_batch_size <= 0:
            p.append(f"train.global_batch_size must be positive, got {t.global_batch_size}")

        if not (o.lr > 0):
            p.append(f"optim.lr must be positive, got {o.lr}")
        if not (0 <= o.min_lr_ratio <= 1):
            p.append(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if not (0 <= o.warmup_fraction < 1):
            p.append(f"optim.warmup_fraction must be in [0, 1), got {o.warmup_fraction}")
        elif t.steps > 0 and self.warmup_steps >= t.steps:
            p.append(f"warmup ({self.warmup_steps} steps) must be shorter than training ({t.steps} steps)")
        for name in ("adam_beta1", "adam_beta2"):
            if not (0 <= getattr(o, name) < 1):
                p.append(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
        if o.weight_decay < 0 or o.clip_grad <= 0 or o.adam_eps <= 0:
            p.append("optim.weight_decay must be >= 0, optim.clip_grad and optim.adam_eps > 0")

        if self.loss.impl not in LOSS_IMPLS:
            p.append(f"loss.impl must be one of {LOSS_IMPLS}, got {self.loss.impl!r}")
        if self.loss.chunk_tokens <= 0:
            p.append(f"loss.chunk_tokens must be positive, got {self.loss.chunk_tokens}")

        if min(par.tp, par.pp, par.cp) < 1:
            p.append(f"parallel sizes must be >= 1, got tp={par.tp} pp={par.pp} cp={par.cp}")
            return p
        if par.pp > 1:
            p.append(f"parallel.pp={par.pp} is not supported: packed THD rows vary in length, and megatron's "
                     "pipeline send/recv uses fixed shapes from the sequence length (no variable_seq_lengths), "
                     "so it hangs or crashes; use parallel.pp=1 and split with parallel.tp / parallel.cp")
        if par.recompute not in RECOMPUTE:
            p.append(f"parallel.recompute must be one of {RECOMPUTE}, got {par.recompute!r}")
        if par.sequence_parallel and par.tp == 1:
            p.append("parallel.sequence_parallel needs tp > 1")
        p += divisibility_problems(arch, self.data.sequence_length, par, self.cluster.world_size,
                                   t.global_batch_size, t.micro_batch_size)

        if ck.init not in INIT_MODES:
            p.append(f"checkpoint.init must be one of {INIT_MODES}, got {ck.init!r}")
        elif ck.init != "none" and not ck.init_from:
            p.append(f"checkpoint.init={ck.init} needs checkpoint.init_from")
        if ck.save_interval <= 0:
            p.append(f"checkpoint.save_interval must be positive, got {ck.save_interval}")
        if ck.init_from and os.path.abspath(ck.init_from) == os.path.abspath(ck.dir):
            p.append("checkpoint.init_from must differ from checkpoint.dir (the stage's own checkpoints)")
        if ck.optim_reshardable not in (True, False, "auto") or not isinstance(ck.optim_reshardable, (bool, str)):
            p.append(f"checkpoint.optim_reshardable must be auto, true or false, got {ck.optim_reshardable!r}")
        if ck.optim_read_by == self.name:
            p.append("checkpoint.optim_read_by names this recipe: it is the recipe that loads this stage's "
                     "Adam state next (its own resumes always can)")
        return p

    def validate(self) -> "RecipeConfig":
        problems = self.problems()
        if problems:
            raise RecipeError(f"recipe {self.name!r} is invalid:\n  - " + "\n  - ".join(problems))
        return self


def divisibility_problems(arch: LlamaArch, seq_length: int, par: ParallelConfig, world_size: int,
                          global_batch_size: int, micro_batch_size: int = 1) -> list[str]:
    """The layout constraints of Megatron-Core + TE's THD context parallelism."""
    p: list[str] = []
    if arch.num_attention_heads % par.tp:
        p.append(f"attention heads ({arch.num_attention_heads}) not divisible by tp={par.tp}")
    if arch.num_query_groups % par.tp:
        p.append(f"KV groups ({arch.num_query_groups}) not divisible by tp={par.tp}")
    if arch.num_layers % par.pp:
        p.append(f"layers ({arch.num_layers}) not divisible by pp={par.pp}")
    if par.cp > 1 and seq_length % (2 * par.cp):
        p.append(f"sequence length {seq_length} not divisible by 2*cp={2 * par.cp} "
                 "(TE's load-balanced THD context parallelism splits every sequence into 2*cp chunks)")
    if par.sequence_parallel and par.tp > 1 and (seq_length // par.cp) % par.tp:
        p.append(f"sequence length / cp = {seq_length // par.cp} not divisible by tp={par.tp} (sequence parallel)")
    mp = par.tp * par.pp * par.cp
    if world_size <= 0:
        p.append(f"world size must be positive, got {world_size}")
    elif world_size % mp:
        p.append(f"world size {world_size} not divisible by tp*pp*cp={mp}")
    else:
        dp = world_size // mp
        if global_batch_size % (micro_batch_size * dp):
            p.append(f"global batch {global_batch_size} not divisible by micro batch {micro_batch_size} "
                     f"x data parallel {dp}")
    return p


# ---------------------------------------------------------------------------------------------
# Distributed-optimizer checkpoint format
# ---------------------------------------------------------------------------------------------
def ddp_bucket_elements(data_parallel_size: int) -> int:
    """megatron's default DDP bucket size (`DistributedDataParallel`, bucket_size=None with
    overlap_grad_reduce): max(40M, 1M x the data-parallel size without CP), in elements."""
    return max(40_000_000, 1_000_000 * data_parallel_size)


def optim_shard_layout(recipe: RecipeConfig) -> tuple[int, int, int]:
    """What megatron's DP-reshardable optimizer checkpoint is tied to: (tp, pp, bucket size).

    The distributed optimizer shards every DDP bucket over the DP x CP group and saves it as
    one tensor per bucket and TP x PP rank ('dp_reshardable'), so a run with other dp / cp
    sizes reads it (each rank its own slice), while other tp or pp sizes are refused by
    Megatron-Bridge ("(TP, PP) mismatch") and other bucket sizes by megatron's
    `per_bucket_numel_unpadded` check.
    """
    par = recipe.parallel
    return par.tp, par.pp, ddp_bucket_elements(max(recipe.data_parallel_size, 1))


def describe_shard_layout(layout: tuple[int, int, int]) -> str:
    tp, pp, bucket = layout
    return f"tp={tp} pp={pp}, {bucket / 1e6:g}M-element DDP buckets"


@dataclass(frozen=True)
class OptimFormat:
    """How a stage saves its distributed-optimizer state (Bridge `dist_ckpt_optim_fully_reshardable`)."""

    reshardable: bool
    reason: str


def optim_checkpoint_format(recipe: RecipeConfig, reader: RecipeConfig | None = None) -> OptimFormat:
    """Fully reshardable (megatron 'fully_reshardable') or DP-reshardable ('dp_reshardable').

    The format is fixed when a checkpoint is saved: loading follows what the checkpoint's
    metadata says, whatever the loading run is configured with. So the stage whose Adam state
    another stage loads decides: `checkpoint.optim_reshardable: auto` saves fully reshardable
    only when `checkpoint.optim_read_by` (default: that recipe as composed, or `reader`) runs a
    layout the DP-reshardable format cannot follow (`optim_shard_layout`). True / false force it.
    """
    ck = recipe.checkpoint
    if not recipe.parallel.distributed_optimizer:
        return OptimFormat(False, "no distributed optimizer: its checkpoint format does not apply")
    if ck.optim_reshardable is True or ck.optim_reshardable is False:
        return OptimFormat(ck.optim_reshardable, f"checkpoint.optim_reshardable={str(ck.optim_reshardable).lower()}")
    if reader is None and ck.optim_read_by:
        from prolong_nemo.recipes.stages import load_recipe

        try:
            reader = load_recipe(ck.optim_read_by)
        except RecipeError as e:
            raise RecipeError(f"checkpoint.optim_read_by={ck.optim_read_by!r}: {e}") from None
    if reader is None:
        return OptimFormat(False, "auto: only this stage's own resumes load its Adam state")
    mine, theirs = optim_shard_layout(recipe), optim_shard_layout(reader)
    if mine == theirs:
        return OptimFormat(False, f"auto: {reader.name} loads it at the same {describe_shard_layout(mine)}; "
                                  "dp and cp may differ")
    return OptimFormat(True, f"auto: {reader.name} loads it at {describe_shard_layout(theirs)}, "
                             f"this stage saves at {describe_shard_layout(mine)}")
