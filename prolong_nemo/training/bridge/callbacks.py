"""Megatron-Bridge callbacks of the ProLong recipes (Bridge >= 0.5 for `on_data_init_start`).

- `SignalTrapCallback` (Bridge < 0.6 only): installs the SIGTERM trap that
  `train.exit_signal_handler=True` asks for; Bridge 0.5 builds it but never enters it.
- `StageChainCallback`: stage 512K starts from stage 64K's weights AND Adam state with a fresh
  step count, data position and LR schedule. Bridge loads the checkpoint in `setup()`; this
  event fires right after, before the data loaders are built from `consumed_train_samples`.
- `ProgressLogCallback`: one line per log interval with progress, ETA, global tokens/s, model
  TFLOP/s per GPU, peak memory and the lm loss (the global per-token mean).
- `ModelRecordCallback`: records the architecture and the bos/eos ids of the start model in
  every checkpoint Bridge saves, so the HF export writes them (e.g. Instruct's <|eot_id|>).

Only `megatron.bridge.training.callbacks` is imported, a module without heavy dependencies.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from megatron.bridge.training.callbacks import Callback, CallbackContext

from prolong_nemo.convert.hf_config import HfExtras
from prolong_nemo.convert.mapping import ConversionError
from prolong_nemo.convert.megatron_io import (
    read_recorded_ids,
    resolve_iter_dir,
    tracked_iter_dir,
    write_prolong_record,
)
from prolong_nemo.training.bridge.sections import TRAIN_STATE_COUNTERS
from prolong_nemo.training.progress import ProgressMeter
from prolong_nemo.training.schedule import restart_schedule
from prolong_nemo.training.start import StartPoint


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
        self.schedule = dict(schedule)  # schedule.schedule_of(recipe, increment=global batch)
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
        # The optimizer was built with the loaded stage's LRs (bridge.build_config_container);
        # from here on this stage's are the config's, so its saves record (and resume with) them.
        optimizer_cfg = getattr(cfg, "optimizer", None)
        if optimizer_cfg is not None:
            optimizer_cfg.lr, optimizer_cfg.min_lr = self.schedule["max_lr"], self.schedule["min_lr"]
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


class ModelRecordCallback(Callback):
    """Record the model in every checkpoint Bridge saves: `iter_XXXXXXX/prolong_record.yaml`.

    What the HF export needs and Bridge's own run_config.yaml lacks: the exact LlamaArch (this
    stage's rope_theta and context) and the bos/eos ids of the model the run started from.

    When `on_checkpoint_save` fires, in Megatron-Bridge 0.5.0 and 0.6.2 alike (training/
    checkpointing.py `save_checkpoint`; see tests/test_bridge_glue.py): on every rank, after the
    torch_dist files are written and all ranks passed a barrier, after rank 0 wrote train_state.pt,
    latest_train_state.pt, latest_checkpointed_iteration.txt and run_config.yaml (`cfg.to_yaml`) of
    the saved folder, before the old-checkpoint cleanup and the closing barrier (so the record is
    on disk before any rank leaves the save, e.g. to exit on SIGTERM). With `async_save` it is a
    finalize step of the async request, run iterations later, in the same order after those
    files. The context carries no path or iteration (state, model, optimizer, user_state), and
    under async save `train_state.step` has moved on by then: the folder is the one the tracker
    names, which rank 0 wrote just before in the same sequence. Only rank 0 writes (Bridge's
    writer of run_config.yaml, so no shared-file-system lag matters).

    A file of its own rather than a section merged into run_config.yaml: that file is Bridge's
    (it writes it at every save of the folder, reads it back on load for TP/PP and optimizer-format
    checks, sanitizes and migrates it): merging would rewrite content we do not own through a
    YAML round trip, and a crash mid-rewrite could damage a file resume depends on. Our file is
    written atomically (temp + rename) and Bridge never reads or rewrites it;
    `megatron_io.read_recorded_config` prefers it over run_config.yaml.

    Non-persistent checkpoints (local or global) are not recorded: the recipes make none, and an
    export of a checkpoint without a record asks for the ids instead of guessing them.
    """

    def __init__(self, arch, hf_extras: HfExtras | None, source: str = "", log=print) -> None:
        self.arch = arch
        self.hf_extras = hf_extras  # None: not known (the start checkpoint recorded none)
        self.source = source
        self.log = log
        self.recorded: list[Path] = []

    @classmethod
    def for_start(cls, recipe, start: StartPoint, log=print) -> "ModelRecordCallback":
        """The recipe's architecture (at least its training context long) and the ids of the start
        model: a fresh start has the preset's (base Llama-3) ids; chain / weights / resume starts
        inherit those recorded in the checkpoint they load."""
        arch = recipe.arch
        arch = arch.replace(max_position_embeddings=max(arch.max_position_embeddings, recipe.data.sequence_length))
        source = start.pretrained if start.kind == "weights" else start.load
        extras = HfExtras() if start.kind == "fresh" else None
        if start.kind != "fresh":
            try:
                extras = read_recorded_ids(resolve_iter_dir(Path(source)))
            except (ConversionError, OSError, yaml.YAMLError):
                extras = None
            if extras is None and _rank() == 0:
                log(f"[prolong] {source} records no bos/eos token ids: this run's checkpoints record the "
                    "architecture only; export them with --ids-from HF_DIR (the model the run started from)")
        return cls(arch, extras, source=f"prolong_nemo {recipe.name} (Megatron-Bridge), {start.describe()}", log=log)

    def on_checkpoint_save(self, context: CallbackContext) -> None:
        if _rank() != 0:
            return
        root = getattr(getattr(context.state.cfg, "checkpoint", None), "save", None)
        try:  # the folder just saved: rank 0 wrote the tracker right before this event
            folder = tracked_iter_dir(Path(root)) if root else None
        except (ConversionError, OSError):
            folder = None
        if folder is None or not folder.is_dir():
            self.log(f"[prolong] warning: no saved checkpoint folder found under {root}; "
                     "its model record is missing (export it with --ids-from HF_DIR)")
            return
        write_prolong_record(folder, self.arch, self.hf_extras, self.source)
        self.recorded.append(folder)
