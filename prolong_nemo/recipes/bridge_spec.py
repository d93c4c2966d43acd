"""What a recipe means for Megatron-Bridge, as plain data (no Bridge import).

`bridge.py` turns these into Bridge's config classes inside the container; keeping the mapping
here lets CPU tests check every field name against the installed Megatron packages, and lets the
CPU runner share the stage-chaining and progress-logging logic with the GPU path.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prolong_nemo.model.config import LlamaArch
from prolong_nemo.recipes.config import RecipeConfig, RecipeError, optim_checkpoint_format

# Tracker files a Megatron(-Bridge) checkpoint root holds next to its iter_XXXXXXX/ folders.
TRACKER_FILES = ("latest_train_state.pt", "latest_checkpointed_iteration.txt")


def has_checkpoint(root: str | None) -> bool:
    """A checkpoint root: a tracker file. `latest_train_state.pt` alone, with no
    `latest_checkpointed_iteration.txt` and no iteration folder, is refused: it would be
    reported as a resume and load nothing."""
    if not root or not any(os.path.isfile(os.path.join(root, f)) for f in TRACKER_FILES):
        return False
    if not os.path.isfile(os.path.join(root, TRACKER_FILES[1])) and not any(
            (name.startswith("iter_") or name == "release") and os.path.isdir(os.path.join(root, name))
            for name in os.listdir(root)):
        raise RecipeError(f"{root}: holds {TRACKER_FILES[0]} but neither {TRACKER_FILES[1]} nor any iter_* "
                          "checkpoint folder, so there is nothing to resume from (restore the checkpoint, "
                          "or remove the file to start this stage afresh)")
    return True


@dataclass(frozen=True)
class StartPoint:
    """Where a (re)submitted stage starts.

    resume  the stage's own checkpoint directory has a checkpoint: everything continues
            (weights, optimizer, scheduler, step, consumed samples = data position);
    chain   first start of a stage that inherits weights AND optimizer state: load the previous
            stage's checkpoint, then restart step, consumed samples and LR schedule at 0;
    weights first start from a checkpoint's weights only (Bridge `pretrained_checkpoint`);
    fresh   random initialization.
    """

    kind: Literal["resume", "chain", "weights", "fresh"]
    load: str | None
    pretrained: str | None = None

    def describe(self) -> str:
        return {
            "resume": f"resuming from {self.load}",
            "chain": f"starting from {self.load} (weights + optimizer state), step and LR schedule restarted",
            "weights": f"starting from the weights of {self.pretrained}",
            "fresh": "starting from random initialization",
        }[self.kind]


def resolve_start(recipe: RecipeConfig) -> StartPoint:
    """Decide from the file system; all ranks see the same shared directories."""
    ck = recipe.checkpoint
    if has_checkpoint(ck.dir):
        return StartPoint("resume", load=ck.dir)
    if ck.init == "none":
        return StartPoint("fresh", load=ck.dir)
    if not ck.init_from or not (has_checkpoint(ck.init_from) or _is_iteration_dir(ck.init_from)):
        raise RecipeError(
            f"{recipe.name} starts from checkpoint.init_from={ck.init_from!r}, which holds no Megatron checkpoint "
            f"(no {' / '.join(TRACKER_FILES)}); train the previous stage first or convert the HF model")
    if ck.init == "weights_and_optimizer":
        return StartPoint("chain", load=ck.init_from)
    # Bridge prefers `load` when it holds a checkpoint (a resumed run), else `pretrained_checkpoint`.
    return StartPoint("weights", load=ck.dir, pretrained=ck.init_from)


def _is_iteration_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, m)) for m in (".metadata", "metadata.json", "run_config.yaml"))


# ---------------------------------------------------------------------------------------------
# Restarting the schedule (stage chaining), shared by the Bridge callback and the CPU runner
# ---------------------------------------------------------------------------------------------
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


def recorded_optimizer_lrs(root: str) -> dict[str, float]:
    """`lr` / `min_lr` of the optimizer that saved the latest checkpoint under `root`.

    megatron-core >= 0.19 matches the param groups of a loaded optimizer state to the new
    optimizer's by their `max_lr` / `min_lr` (a KeyError when they differ), so a chained stage
    builds its optimizer with the loaded stage's values and restarts the schedule with its own
    after the load. Read from Bridge's run_config.yaml of that checkpoint.
    """
    import yaml

    from prolong_nemo.convert.mapping import ConversionError
    from prolong_nemo.convert.megatron_io import bridge_run_config

    try:
        optimizer = bridge_run_config(Path(root)).get("optimizer") or {}
        return {"lr": float(optimizer["lr"]), "min_lr": float(optimizer["min_lr"])}
    except (ConversionError, OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise RecipeError(f"{root}: cannot read the optimizer's lr / min_lr of its latest checkpoint's "
                          f"run_config.yaml to chain from it ({e})") from None


# Counters of Megatron-Bridge's TrainState that the restarted stage must start from zero.
TRAIN_STATE_COUNTERS = ("step", "consumed_train_samples", "skipped_train_samples", "consumed_valid_samples",
                        "floating_point_operations_so_far")


# ---------------------------------------------------------------------------------------------
# Progress log: progress, ETA, tokens/s, model TFLOP/s per GPU, memory, lm loss
# ---------------------------------------------------------------------------------------------
def model_flops_per_token(arch: LlamaArch, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), no recompute counted.

    Forward: 2 x every matmul weight (the embedding is a lookup) plus causal attention over
    the packed sequence, 2 x 2 x h per layer and attended position, s/2 positions on average.
    Document masking skips cross-document blocks, so this is the nominal (upper) count.
    """
    h, f, g, d, L = (arch.hidden_size, arch.ffn_hidden_size, arch.num_query_groups, arch.head_dim,
                     arch.num_layers)
    per_layer = h * (arch.num_attention_heads * d + 2 * g * d) + arch.num_attention_heads * d * h + 3 * h * f
    matmul = L * per_layer + arch.vocab_size * h
    attention = L * 4 * h * (seq_length / 2)
    return 3 * (2 * matmul + attention)


@dataclass
class ProgressMeter:
    total_steps: int
    tokens_per_step: int
    flops_per_step: float
    world_size: int
    started: float = 0.0
    first_step: int | None = None

    @classmethod
    def for_recipe(cls, recipe: RecipeConfig, world_size: int | None = None) -> "ProgressMeter":
        return cls(total_steps=recipe.train.steps, tokens_per_step=recipe.tokens_per_step,
                   flops_per_step=model_flops_per_token(recipe.arch, recipe.data.sequence_length)
                   * recipe.tokens_per_step,
                   world_size=world_size or max(recipe.cluster.world_size, 1))

    def line(self, step: int, loss: float, step_seconds: float, memory_bytes: float | None,
             lr: float | None = None, now: float | None = None) -> str:
        """One log line after optimizer step `step` (1-based) that took `step_seconds`."""
        now = time.perf_counter() if now is None else now
        if self.first_step is None:  # the ETA uses the steps done by this process
            self.first_step, self.started = step - 1, now - step_seconds
        done = max(step - self.first_step, 1)
        eta = (now - self.started) / done * max(self.total_steps - step, 0)
        tokens_s = self.tokens_per_step / step_seconds if step_seconds > 0 else float("nan")
        tflops = self.flops_per_step / step_seconds / self.world_size / 1e12 if step_seconds > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)",
                 f"lm loss {loss:.4f}"]
        if lr is not None:
            parts.append(f"lr {lr:.3e}")
        parts += [f"tokens/s {tokens_s:,.0f}", f"model TFLOP/s/GPU {tflops:.3g}"]
        if memory_bytes is not None:
            parts.append(f"mem {memory_bytes / 1e9:.2f} GB")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


# ---------------------------------------------------------------------------------------------
# Recipe -> keyword arguments of Megatron-Bridge's ConfigContainer sections
# ---------------------------------------------------------------------------------------------
def bridge_sections(recipe: RecipeConfig, start: StartPoint) -> dict[str, dict[str, Any]]:
    """Keyword arguments per ConfigContainer field (model and dataset are built in bridge.py).

    Torch dtypes are left out (this module does not import torch): bridge.py adds them.
    """
    r, o, par, ck = recipe, recipe.optim, recipe.parallel, recipe.checkpoint
    chain = start.kind == "chain"
    return {
        "train": dict(
            micro_batch_size=r.train.micro_batch_size,
            global_batch_size=r.train.global_batch_size,
            train_iters=r.train.steps,
            # save on SIGTERM (Slurm preemption / time limit); Bridge 0.5 needs SignalTrapCallback for it
            exit_signal_handler=True,
            # ... and in the data-loader workers: torchrun / Slurm signal the whole process group,
            # and a worker that dies of the SIGTERM fails the step before the checkpoint is saved
            exit_signal_handler_for_dataloader=True,
        ),
        "validation": dict(eval_iters=0, eval_interval=None),
        "scheduler": dict(
            lr_decay_style="cosine",
            lr_warmup_iters=r.warmup_steps,
            lr_warmup_init=0.0,
            lr_decay_iters=r.train.steps,
            start_weight_decay=o.weight_decay,
            end_weight_decay=o.weight_decay,
            weight_decay_incr_style="constant",
            # Chaining: the recipe, not the previous stage's checkpoint, defines the schedule.
            override_opt_param_scheduler=chain,
            use_checkpoint_opt_param_scheduler=not chain,
        ),
        "optimizer": dict(
            optimizer="adam",  # AdamW: megatron's Adam decouples weight decay
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=True,
            fp16=False,
            use_distributed_optimizer=par.distributed_optimizer,
        ),
        "ddp": dict(
            grad_reduce_in_fp32=par.grad_reduce_in_fp32,
            overlap_grad_reduce=True,
            overlap_param_gather=par.distributed_optimizer,
            use_distributed_optimizer=par.distributed_optimizer,
            # Per-token loss: gradients are summed and divided by the global token count once.
            average_in_collective=False,
            check_for_nan_in_grad=True,
        ),
        "checkpoint": dict(
            save=ck.dir,
            load=start.load,
            pretrained_checkpoint=start.pretrained,
            save_interval=ck.save_interval,
            ckpt_format=ck.format,
            save_optim=True,
            save_rng=True,
            load_optim=True,
            load_rng=not chain,
            fully_parallel_save=True,
            # Adam-state format of this stage's saves: fully reshardable gathers the whole state
            # into host memory on every save and load, so only when the stage that loads it runs
            # another tp / pp / bucket size (recipes/README.md, "Optimizer checkpoint format").
            dist_ckpt_optim_fully_reshardable=optim_checkpoint_format(recipe).reshardable,
            async_save=False,
        ),
        "logger": dict(
            log_interval=r.logging.log_interval,
            tensorboard_dir=r.logging.tensorboard_dir,
            log_throughput=True,
            log_memory_to_tensorboard=True,
            log_timers_to_tensorboard=True,
            wandb_project=r.logging.wandb_project,
            wandb_exp_name=r.name if r.logging.wandb_project else None,
        ),
        "rng": dict(seed=r.train.seed),
        # Data is pre-tokenized MDS: Bridge only needs a vocabulary size.
        "tokenizer": dict(tokenizer_type="NullTokenizer", vocab_size=r.arch.vocab_size),
    }


def dataset_fields(recipe: RecipeConfig) -> dict[str, Any]:
    """Fields of `ProLongDatasetProvider` (declarative values only: Bridge saves them as YAML)."""
    d, par = recipe.data, recipe.parallel
    return dict(
        domains=[{"path": p, "proportion": w} for p, w in d.domain_paths()],
        seq_length=d.sequence_length,
        seed=d.seed,
        document_masking=d.document_masking,
        instruction_masks=d.instruction_masks,
        cp_size=par.cp,
        tp_size=par.tp,
        sequence_parallel=par.sequence_parallel,
        vocab_size=recipe.arch.vocab_size,
        cache_dir=d.cache_dir,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        dataloader_type="single",  # sampler starts at consumed_train_samples: exact data resume
        pin_memory=True,
        drop_last=True,
    )


def model_overrides(recipe: RecipeConfig) -> dict[str, Any]:
    """Settings applied to the model provider on top of `to_bridge_provider`."""
    par = recipe.parallel
    out: dict[str, Any] = dict(calculate_per_token_loss=recipe.loss.per_token)
    if par.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform",
                   recompute_num_layers=par.recompute_num_layers)
    elif par.recompute == "selective":
        out.update(recompute_granularity="selective", recompute_method=None, recompute_num_layers=None)
    else:
        out.update(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    return out


def build_prolong_datasets(*, domains: list[dict], seq_length: int, seed: int, document_masking: bool,
                           cp_size: int, tp_size: int, sequence_parallel: bool, vocab_size: int,
                           cache_dir: str | None, train_samples: int, valid_samples: int = 0,
                           test_samples: int = 0, instruction_masks: bool = True) -> list:
    """Train / valid / test datasets of the data adapter for a provider's fields.

    `instruction_masks`: the reference applies MDS `mask` columns only in SFT
    (`apply_instruct_masks`); stages 1 and 2 train on every token of tuluv2 too.
    """
    from prolong_nemo.data.dataset import build_datasets, dataset_config
    from prolong_nemo.data.mixture import Mixture
    from prolong_nemo.data.packing import PackingConfig

    mixture = Mixture.parse([(d["path"], d["proportion"]) for d in domains])
    packing = PackingConfig(cp_size=cp_size, tp_size=tp_size, sequence_parallel=sequence_parallel,
                            document_masking=document_masking, instruction_masks=instruction_masks)
    config = dataset_config(mixture, sequence_length=seq_length, seed=seed, packing=packing,
                            vocab_size=vocab_size, cache_dir=cache_dir)
    sizes = [train_samples, valid_samples or None, test_samples or None]
    return build_datasets(config, sizes)
