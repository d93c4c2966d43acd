"""Megatron-Bridge callbacks of the ProLong recipes (Bridge >= 0.5 for `on_data_init_start`).

- `SignalTrapCallback` (Bridge < 0.6 only): installs the SIGTERM trap that
  `train.exit_signal_handler=True` asks for; Bridge 0.5 builds it but never enters it.
- `StageChainCallback`: stage 512K starts from stage 64K's weights AND Adam state with a fresh
  step count, data position and LR schedule. Bridge loads the checkpoint in `setup()`; this
  event fires right after, before the data loaders are built from `consumed_train_samples`.
- `ProgressLogCallback`: one line per log interval with progress, ETA, global tokens/s, model
  TFLOP/s per GPU, peak memory and the lm loss (the global per-token mean).

Only `megatron.bridge.training.callbacks` is imported, a module without heavy dependencies.
"""

from __future__ import annotations

import time

import torch
from megatron.bridge.training.callbacks import Callback, CallbackContext

from prolong_nemo.recipes.bridge_spec import TRAIN_STATE_COUNTERS, ProgressMeter, restart_schedule


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class SignalTrapCallback(Callback):
    """Install Bridge's own SIGTERM trap where Bridge builds it without installing it.

    Bridge 0.5's `GlobalState._set_signal_handler` constructs `DistributedSignalHandler` but
    never calls its `__enter__`, so no OS handler is installed: with
    `train.exit_signal_handler=True` a Slurm SIGTERM still kills the ranks instead of making
    the loop save a checkpoint and exit (Bridge 0.6 enters it when the config is set:
    NVIDIA-NeMo/Megatron-Bridge#3823). Entering the same object makes Bridge's polled exit
    branch (`signals_received()`) work. It is entered at `on_data_init_start`, before the data
    loaders fork their workers, so that (as with Bridge 0.6) the workers inherit the trap
    instead of dying on the SIGTERM and failing the step before the checkpoint.
    `bridge.callbacks_for` adds this callback for Bridge < 0.6 only.
    """

    def __init__(self) -> None:
        self.installed = False

    def on_data_init_start(self, context: CallbackContext) -> None:
        cfg = getattr(context.state, "cfg", None)
        if not getattr(getattr(cfg, "train", None), "exit_signal_handler", False):
            return
        handler = context.state.signal_handler
        # Entered handlers remember the previous disposition; Bridge 0.5's never has one.
        if handler is not None and handler.original_handler is None and not handler.released:
            handler.__enter__()
            self.installed = True


class StageChainCallback(Callback):
    """Restart step, consumed samples and LR schedule after loading the previous stage."""

    def __init__(self, init_from: str, schedule: dict, log=print) -> None:
        self.init_from = init_from
        self.schedule = dict(schedule)  # bridge_spec.schedule_of(recipe, increment=global batch)
        self.log = log
        self.applied = False

    def on_data_init_start(self, context: CallbackContext) -> None:
        cfg = getattr(context.state, "cfg", None)
        loaded = getattr(getattr(cfg, "checkpoint", None), "load", self.init_from)
        if loaded != self.init_from:  # only the first start of a chained stage resets anything
            raise RuntimeError(f"StageChainCallback expects checkpoint.load={self.init_from!r}, got {loaded!r}")
        # This stage's schedule as Bridge computed it (in samples) must be the one restored.
        planned = getattr(cfg, "scheduler", None)
        for ours, bridge_name in (("warmup_steps", "lr_warmup_steps"), ("decay_steps", "lr_decay_steps")):
            theirs = getattr(planned, bridge_name, None)
            if theirs is not None and int(theirs) != self.schedule[ours]:
                raise RuntimeError(f"StageChainCallback schedule {ours}={self.schedule[ours]} differs from "
                                   f"Bridge's scheduler.{bridge_name}={theirs} (units: samples)")
        train_state = context.state.train_state
        previous = train_state.step
        for name in TRAIN_STATE_COUNTERS:
            setattr(train_state, name, 0)
        restart_schedule(context.scheduler, context.optimizer, **self.schedule)
        self.applied = True
        if _rank() == 0:
            self.log(f"[prolong] loaded {self.init_from} at its step {previous}: weights and Adam state kept, "
                     f"step, consumed samples and LR schedule restarted at 0")


class ProgressLogCallback(Callback):
    """Progress, ETA, tokens/s, model TFLOP/s per GPU, memory and lm loss, every `interval` steps."""

    def __init__(self, meter: ProgressMeter, interval: int = 1, log=print) -> None:
        self.meter = meter
        self.interval = max(1, interval)
        self.log = log
        self._step_started: float | None = None

    def on_train_step_start(self, context: CallbackContext) -> None:
        self._step_started = time.perf_counter()

    def on_train_step_end(self, context: CallbackContext) -> None:
        step = context.state.train_state.step + 1  # Bridge increments the step after this event
        if step % self.interval and step != self.meter.total_steps:
            return
        loss = (context.loss_dict or {}).get("lm loss")
        if loss is None:  # not the last pipeline stage: it has no loss to report
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds = now - (self._step_started if self._step_started is not None else now)
        memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        lr = context.optimizer.param_groups[0]["lr"] if context.optimizer is not None else None
        line = self.meter.line(step, float(loss), seconds, memory, lr=float(lr) if lr is not None else None, now=now)
        if _rank() == (torch.distributed.get_world_size() - 1 if torch.distributed.is_initialized() else 0):
            self.log(f"[prolong] {line}")
