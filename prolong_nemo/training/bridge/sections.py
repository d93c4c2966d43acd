"""What a recipe means for Megatron-Bridge's `ConfigContainer` sections, as plain data.

No Bridge import (torch only for the model's dtype): `config.py` turns these into Bridge's
config classes inside the container, CPU tests check every field name against the pinned
Bridge sources, and `container_view` shows them (`prolong-nemo train <recipe> --cfg job`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from prolong_nemo.recipes.config import RecipeConfig, RecipeError, optim_checkpoint_format
from prolong_nemo.training.start import StartPoint

# Counters of Megatron-Bridge's TrainState that the restarted stage must start from zero.
TRAIN_STATE_COUNTERS = ("step", "consumed_train_samples", "skipped_train_samples", "consumed_valid_samples",
                        "floating_point_operations_so_far")


def bridge_sections(recipe: RecipeConfig, start: StartPoint) -> dict[str, dict[str, Any]]:
    """Keyword arguments per ConfigContainer field (model and dataset are built in config.py).

    Torch dtypes are left out (this module does not import torch): config.py adds them.
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


def apply_bridge_overrides(container: Any, overrides: Any) -> None:
    """`recipe.bridge.<section>.<field>` onto a built ConfigContainer, after our own mapping.

    Every name is checked against the dataclass Bridge built for that section (so a typo or a
    field this Bridge release lacks is one error naming it, not a silent no-op); a dict value
    for a field holding a dataclass sets its fields the same way. Bridge's own
    `ConfigContainer.validate()` (in `pretrain`) then checks the values together.
    """
    for section, values in overrides.items():
        target = getattr(container, section, None)
        if not dataclasses.is_dataclass(target):
            raise RecipeError(f"bridge.{section}: this Megatron-Bridge's ConfigContainer has no {section} section")
        _set_fields(target, values, f"bridge.{section}")


def _set_fields(target: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RecipeError(f"{where}.{key}: {type(target).__name__} has no field {key!r}{hint}")
        current = getattr(target, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            _set_fields(current, value, f"{where}.{key}")
        else:
            setattr(target, key, value)


def model_provider_inputs(recipe: RecipeConfig) -> tuple:
    """(arch, seq_length, ParallelSizes, RuntimeOptions) of the recipe's `GPTModelProvider`
    (`model.megatron_config.to_bridge_provider`), before `model_overrides`."""
    import torch

    from prolong_nemo.model.megatron_config import ParallelSizes, RuntimeOptions

    par = recipe.parallel
    return (recipe.arch, recipe.data.sequence_length,
            ParallelSizes(tp=par.tp, pp=par.pp, cp=par.cp, sequence_parallel=par.sequence_parallel),
            RuntimeOptions(params_dtype=torch.bfloat16, use_cpu_initialization=False, fusions=True,
                           recompute_layers=par.recompute == "full"))


def container_view(recipe: RecipeConfig, start: StartPoint) -> dict[str, Any]:
    """Every ConfigContainer field our mapping sets, as `section.field` -> value, with the
    recipe's `bridge.*` fields applied last (what `config.build_config_container` builds;
    Bridge's own defaults fill the rest)."""
    from prolong_nemo.model.megatron_config import bridge_provider_kwargs
    from prolong_nemo.training.data import dataset_fields

    sections = bridge_sections(recipe, start)
    sections["model"] = {**bridge_provider_kwargs(*model_provider_inputs(recipe)), **model_overrides(recipe)}
    sections["dataset"] = dataset_fields(recipe)
    sections["mixed_precision"] = {"recipe": "bf16_mixed", "grad_reduce_in_fp32": recipe.parallel.grad_reduce_in_fp32}
    view = {f"{name}.{key}": value for name, values in sections.items() for key, value in values.items()}
    view.update(_flatten(dict(recipe.bridge.items()), "bridge_overrides"))
    return {key.removeprefix("bridge_overrides."): value for key, value in view.items()}


def _flatten(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out
