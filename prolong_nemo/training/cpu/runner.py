"""Real training steps on CPU through megatron-core (gloo), for tests and the demo.

Uses megatron-core's `get_forward_backward_func` with the same `forward_step` and per-token
loss as the Megatron-Bridge path. What a CPU cannot run from megatron-core (its DDP buffers,
distributed optimizer and fused clipping allocate on CUDA) is replaced by plain PyTorch with
the same semantics: `finalize_grads` sums gradients over DP x CP and divides by the global
token count, exactly like megatron's `finalize_model_grads` under per-token loss; AdamW;
megatron's own `OptimizerParamScheduler` (linear warmup, cosine decay to min LR).
Checkpoints are megatron dist checkpoints laid out as Megatron-Bridge does:
`<root>/iter_0000010/` + `<root>/latest_checkpointed_iteration.txt`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from prolong_nemo.model.config import LlamaArch, preset
from prolong_nemo.model.cross_entropy import DEFAULT_CHUNK_TOKENS
from prolong_nemo.model.loss import LossImpl, global_token_mean
from prolong_nemo.model.megatron_config import ParallelSizes
from prolong_nemo.training.forward_step import StepOptions, make_forward_step

LATEST_FILE = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "llama3-tiny"
    rope_theta: float | None = None  # None: the preset's
    seq_length: int = 512  # longest row; sizes RoPE tables
    train_iters: int = 20
    micro_batches: int = 2  # per optimizer step and DP rank
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 2
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0
    loss_impl: LossImpl = "chunked"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    save_dir: str | None = None
    save_interval: int = 0  # 0: only at the end
    exit_after: int | None = None  # stop after N steps of this run WITHOUT saving (simulated crash)
    stop_after: int | None = None  # stop after N steps of this run, saving first (a planned pause)
    metrics_file: str | None = None  # JSON lines, one per step, full-precision loss
    log_interval: int = 1
    seed: int = 1234
    cp: int = 1  # context parallel size (processes via torchrun; rows must be padded for it)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_iters < self.train_iters:
            raise ValueError(f"warmup_iters {self.warmup_iters} must be in [0, train_iters={self.train_iters})")
        if self.micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")


@dataclass
class StepRecord:
    step: int
    loss: float
    tokens: int
    seconds: float


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    step: int = 0
    consumed_samples: int = 0
    arch: LlamaArch | None = None  # recorded in every checkpoint, so exports carry its rope_theta
    hf_extras: object | None = None  # bos/eos ids of the model the run started from, recorded too
    history: list[StepRecord] = field(default_factory=list)


# ---- process groups ------------------------------------------------------------------------


def init_distributed(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> None:
    """gloo process group (torchrun env or a world of one) + megatron model-parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from prolong_nemo.cpu_compat import apply_cpu_patches

    apply_cpu_patches(force=True)  # a CPU run, even on a machine that has a GPU
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:  # torchrun (or the user) set up the rendezvous
            dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:  # a world of one on a free port, leaving os.environ (and child processes) alone
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp, context_parallel_size=cp)
    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_context_parallel_world_size())
    if sizes != (tp, pp, cp):
        raise RuntimeError(f"model-parallel groups already exist with (tp, pp, cp) = {sizes}, not {(tp, pp, cp)}")
    model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finalize_grads(model_chunks, num_tokens: torch.Tensor | None, pg_collection=None, force_all_reduce=False):
    """megatron `finalize_model_grads` semantics for plain modules: sum over DP x CP, / tokens."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    multi = dist.get_world_size(group) > 1
    params = [p for m in model_chunks for p in m.parameters() if p.grad is not None]
    if multi:
        for p in params:
            dist.all_reduce(p.grad, group=group)
    if num_tokens is not None:
        if multi:
            dist.all_reduce(num_tokens, group=group)
        scale = 1.0 / num_tokens.clamp(min=1).float()
        for p in params:
            p.grad.mul_(scale)


# ---- model / optimizer ---------------------------------------------------------------------


def build_state(cfg: TrainConfig) -> TrainState:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from prolong_nemo.model.builder import build_gpt_model

    arch = preset(cfg.preset) if cfg.rope_theta is None else preset(cfg.preset, rope_theta=cfg.rope_theta)
    # the context this run trains is the model's context from now on
    arch = arch.replace(max_position_embeddings=max(arch.max_position_embeddings, cfg.seq_length))
    torch.manual_seed(cfg.seed)
    model = build_gpt_model(arch, cfg.seq_length, backend="local", parallel=ParallelSizes(cp=cfg.cp))
    model.config.finalize_model_grads_func = finalize_grads
    # megatron's convention: no weight decay on norms and biases (1-D parameters).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_iters,
        lr_decay_steps=cfg.train_iters, lr_decay_style="cosine", start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay, wd_incr_steps=cfg.train_iters, wd_incr_style="constant",
    )
    return TrainState(model, optimizer, scheduler, arch=arch)


# ---- checkpoints ---------------------------------------------------------------------------


def _iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: str | Path, log: Callable[[str], None] | None = None) -> int | None:
    """The step of the checkpoint a resume reads (a damaged marker: the newest complete one)."""
    from prolong_nemo.convert.megatron_io import latest_iter_dir

    folder = latest_iter_dir(Path(root), log)
    if folder is None:
        return None
    return 0 if folder.name == "release" else int(folder.name.removeprefix("iter_"))


def latest_checkpoint(root: str | Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The iteration folder to resume from, checked before megatron unpickles anything of it
    (`megatron_io.check_checkpoint`); None when `root` holds no marker."""
    from prolong_nemo.convert.megatron_io import check_checkpoint

    return check_checkpoint(Path(root), log) if (Path(root) / LATEST_FILE).is_file() else None


def save_checkpoint(root: str | Path, state: TrainState) -> Path:
    from megatron.core import dist_checkpointing

    root = Path(root)
    target = _iter_dir(root, state.step)
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sharded = {
        "model": state.model.sharded_state_dict(),
        # Plain (common) state: replicated on every rank of a CPU run (TP = PP = 1).
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "train_state": {"step": state.step, "consumed_samples": state.consumed_samples},
    }
    dist_checkpointing.save(sharded, str(target))
    if dist.get_rank() == 0 and state.arch is not None:
        from prolong_nemo.convert import write_run_config

        write_run_config(target, state.arch, state.hf_extras, source="prolong_nemo cpu runner")
    dist.barrier()
    if dist.get_rank() == 0:
        from prolong_nemo.convert.megatron_io import write_atomic

        write_atomic(root / LATEST_FILE, f"{state.step}\n".encode())
    return target


def recorded_hf_extras(iter_dir: Path):
    """The bos/eos ids a checkpoint recorded (e.g. a converted Instruct model's), else None."""
    from prolong_nemo.convert import ConversionError, read_recorded_config

    try:
        return read_recorded_config(iter_dir)[1]
    except ConversionError:
        return None


def load_model_state(model: torch.nn.Module, state_dict: dict, where: Path) -> None:
    """Load weights, refusing a checkpoint that lacks any (TE's `_extra_state` may differ by spec)."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{where}: checkpoint does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")


def load_checkpoint(root: str | Path, state: TrainState, log: Callable[[str], None] | None = None) -> bool:
    """Resume model, optimizer, scheduler and data position from the latest checkpoint."""
    from megatron.core import dist_checkpointing

    folder = latest_checkpoint(root, log)
    if folder is None:
        return False
    loaded = dist_checkpointing.load({"model": state.model.sharded_state_dict()}, str(folder))
    load_model_state(state.model, loaded["model"], folder)
    state.hf_extras = recorded_hf_extras(folder)
    state.optimizer.load_state_dict(loaded["optimizer"])
    state.scheduler.load_state_dict(loaded["scheduler"])
    state.step = int(loaded["train_state"]["step"])
    state.consumed_samples = int(loaded["train_state"]["consumed_samples"])
    return True


# ---- the loop ------------------------------------------------------------------------------


def _local_rows(dataset: Sequence, start: int, count: int) -> list:
    """This DP rank's `count` rows of the step that starts at sample `start`, handed out by
    megatron's `MegatronPretrainingSampler` (what Megatron-Bridge's "single" data loader uses:
    micro-step k gives rank r sample start + k * dp + r), so both backends read the same rows
    on the same rank (data/balance.py arranges global batches for exactly this layout)."""
    from megatron.core import parallel_state
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    dp = parallel_state.get_data_parallel_world_size()
    sampler = MegatronPretrainingSampler(total_samples=start + count * dp, consumed_samples=start,
                                         micro_batch_size=1, data_parallel_rank=parallel_state.get_data_parallel_rank(),
                                         data_parallel_size=dp)
    return [dataset[i % len(dataset)] for batch in sampler for i in batch]  # the epoch wraps around


def train_step(state: TrainState, cfg: TrainConfig, dataset: Sequence, collate: Callable) -> StepRecord:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp = parallel_state.get_data_parallel_world_size()
    rows = _local_rows(dataset, state.consumed_samples, cfg.micro_batches)
    tokens = torch.tensor(sum(int(r["tokens"].shape[-1]) for r in rows), dtype=torch.int64)
    dist.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
    started = time.perf_counter()
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    reports = get_forward_backward_func()(
        forward_step_func=make_forward_step(StepOptions(cfg.loss_impl, cfg.chunk_tokens)),
        data_iterator=(collate([row]) for row in rows),
        model=[state.model],
        num_microbatches=cfg.micro_batches,
        seq_length=cfg.seq_length,
        micro_batch_size=1,
        forward_only=False,
    )
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip_grad)
    state.optimizer.step()
    state.scheduler.step(1)
    state.step += 1
    state.consumed_samples += cfg.micro_batches * dp
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    record = StepRecord(state.step, global_token_mean(reports, group), int(tokens), time.perf_counter() - started)
    state.history.append(record)
    return record


def peak_rss_bytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def progress_log(cfg: TrainConfig) -> Callable[[StepRecord, "TrainState", float, int], str]:
    """The progress line of a run without a recipe, in the recipes' (and Bridge's) format."""
    from prolong_nemo.training.progress import ProgressMeter, model_flops_per_token

    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens = cfg.seq_length * cfg.micro_batches * max(world // cfg.cp, 1)  # nominal; each line has its own
    meter = ProgressMeter(total_steps=cfg.train_iters, tokens_per_step=tokens, world_size=world,
                          flops_per_step=model_flops_per_token(preset(cfg.preset), cfg.seq_length) * tokens)

    def line(record: StepRecord, state: TrainState, _elapsed: float, _done: int) -> str:
        return "[prolong] " + meter.line(record.step, record.loss, record.seconds, peak_rss_bytes(),
                                         lr=state.optimizer.param_groups[0]["lr"], tokens=record.tokens)

    return line


def train(cfg: TrainConfig, dataset: Sequence, collate: Callable, log: Callable[[str], None] = print, *,
          start: Callable[[TrainState], None] | None = None,
          log_line: Callable[[StepRecord, TrainState, float, int], str] | None = None) -> TrainState:
    """Train and return the final state.

    `start(state)` decides where training starts (the recipes' resume / chain / weights-only
    starts); by default the run resumes from cfg.save_dir when it holds a checkpoint.
    `log_line(record, state, elapsed, steps_done)` formats the progress line.
    """
    init_distributed(cp=cfg.cp, seed=cfg.seed)
    if dist.get_rank() != 0:
        log = lambda _line: None  # noqa: E731 - one log stream per run
    if not cfg.save_dir:
        return _train(cfg, dataset, collate, log, start, log_line)
    from prolong_nemo.training.run_lock import run_lock

    with run_lock(cfg.save_dir, rank=dist.get_rank(), log=log):  # one run per checkpoint dir
        return _train(cfg, dataset, collate, log, start, log_line)


def _train(cfg: TrainConfig, dataset: Sequence, collate: Callable, log: Callable[[str], None],
           start: Callable[[TrainState], None] | None,
           log_line: Callable[[StepRecord, TrainState, float, int], str] | None) -> TrainState:
    state = build_state(cfg)
    if start is not None:
        start(state)
    elif cfg.save_dir and load_checkpoint(cfg.save_dir, state, log):
        log(f"resumed from {cfg.save_dir} at step {state.step} ({state.consumed_samples} samples)")
    log_line = log_line or progress_log(cfg)
    started, steps_done = time.perf_counter(), 0
    while state.step < cfg.train_iters:
        record = train_step(state, cfg, dataset, collate)
        steps_done += 1
        if not math.isfinite(record.loss):
            raise FloatingPointError(f"loss is {record.loss} at step {record.step}")
        if record.step % cfg.log_interval == 0 or record.step == cfg.train_iters:
            log(log_line(record, state, time.perf_counter() - started, steps_done))
        if cfg.metrics_file and dist.get_rank() == 0:
            Path(cfg.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            with open(cfg.metrics_file, "a") as f:
                f.write(json.dumps(asdict(record)) + "\n")
        if cfg.exit_after is not None and steps_done >= cfg.exit_after:
            log(f"stopping after {steps_done} steps without saving (exit_after)")
            break
        stopping = cfg.stop_after is not None and steps_done >= cfg.stop_after
        due = cfg.save_interval and record.step % cfg.save_interval == 0
        if cfg.save_dir and (due or stopping or record.step == cfg.train_iters):
            log(f"saved {save_checkpoint(cfg.save_dir, state)}")
        if stopping:
            log(f"stopping after {steps_done} steps (stop_after); resubmit to continue")
            break
    return state


def config_summary(cfg: TrainConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())
