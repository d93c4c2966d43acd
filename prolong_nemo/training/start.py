"""Where a run starts: resume, chain from the previous stage, weights only, or fresh.

Decided from the file system (`resolve_start`), identically on every rank and for both backends;
each backend then opens the checkpoint its own way (Bridge's `load` / `pretrained_checkpoint`,
the CPU runner's dist-checkpoint load) and restarts the schedule of a chained stage with
`training.schedule.restart_schedule`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prolong_nemo.recipes.config import RecipeConfig, RecipeError

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

    @property
    def opens(self) -> str | None:
        """The checkpoint folder this start reads (checked before anything unpickles it)."""
        return {"resume": self.load, "chain": self.load, "weights": self.pretrained, "fresh": None}[self.kind]

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


# What a checkpoint's tensors are shaped by: a start checkpoint that differs in any of these
# cannot load into the recipe's model (rope_theta and the context length legitimately change
# from stage to stage, so they are not compared).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "tie_word_embeddings")


def check_start(recipe: RecipeConfig, start: StartPoint, *, strict: bool = False, log=None) -> None:
    """Before Megatron-Bridge loads the start checkpoint: nothing in it unpickles code
    (`megatron_io.check_checkpoint`; `strict`: no fallback from a damaged tracker, as Bridge
    reads the tracker itself), then it holds the recipe's architecture. (The CPU backend's
    loaders run the first check themselves: it calls `check_start_architecture` only.)"""
    from prolong_nemo.convert.mapping import ConversionError
    from prolong_nemo.convert.megatron_io import check_checkpoint

    if start.opens is None:
        return
    try:
        folder = check_checkpoint(Path(start.opens), log, strict=strict)
    except ConversionError as e:
        raise RecipeError(str(e)) from None
    check_start_architecture(recipe, start, folder)


def check_start_architecture(recipe: RecipeConfig, start: StartPoint, folder: Path | None = None) -> None:
    """Refuse a start checkpoint whose recorded architecture (YAML only: nothing unpickled)
    differs from the recipe's model, naming every field that differs, instead of a
    tensor-shape exception on one rank. `folder`: the iteration folder the load reads (default:
    the newest complete one). A checkpoint that records no architecture is left to the loader."""
    from prolong_nemo.convert.mapping import ConversionError
    from prolong_nemo.convert.megatron_io import latest_iter_dir, read_recorded_config, resolve_iter_dir

    if start.opens is None:
        return
    try:
        folder = folder or latest_iter_dir(Path(start.opens)) or resolve_iter_dir(Path(start.opens))
        recorded, _ = read_recorded_config(folder)
    except ConversionError:  # nothing to compare with (no record, or no checkpoint the loader would read)
        return
    mine = recipe.arch
    diffs = [f"{name} {getattr(recorded, name)} (checkpoint) vs {getattr(mine, name)} (recipe)"
             for name in SHAPE_FIELDS if getattr(recorded, name) != getattr(mine, name)]
    if diffs:
        raise RecipeError(f"{recipe.name}: the {start.kind} checkpoint {start.opens} holds another model than "
                          f"model.preset={recipe.model.preset}: {'; '.join(diffs)}")
