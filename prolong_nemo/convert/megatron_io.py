"""The Megatron-Bridge checkpoint layout around a torch_dist folder, and the recorded config.

    <root>/latest_checkpointed_iteration.txt   "0" (or "release")
    <root>/latest_train_state.pt               Bridge's tracker (its TrainState, step 0)
    <root>/iter_0000000/                       torch_dist folder (dcp_io)
    <root>/iter_0000000/train_state.pt         the same TrainState
    <root>/iter_0000000/run_config.yaml        Bridge's run config: `model:` + `checkpoint:`
                                               sections, plus our `prolong:` section (converter,
                                               CPU runner)
    <root>/iter_0000000/prolong_record.yaml    our `prolong:` record of a checkpoint Megatron-Bridge
                                               training saved (bridge_callbacks.ModelRecordCallback)
    <root>/iter_0000000/tokenizer/             tokenizer files, when known

Bridge reads `model.tensor_model_parallel_size` / `pipeline_model_parallel_size` and
`checkpoint.save_optim` / `save_rng` / `fully_parallel_save` when loading a
`pretrained_checkpoint`; `prolong.arch` is the exact LlamaArch (rope_theta and
max_position_embeddings of THIS checkpoint) that the HF export writes back out, `prolong.hf` the
bos/eos ids of the model training started from. A checkpoint without `prolong.hf` records no ids:
the export refuses it unless it is told where they come from.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from prolong_nemo.convert.dcp_io import (
    MCORE_CONFIG_FILE,
    METADATA_FILE,
    check_object_records,
    check_pickle_file,
    load_metadata,
)
from prolong_nemo.convert.hf_config import HfExtras, normalize_rope_scaling
from prolong_nemo.convert.mapping import ConversionError
from prolong_nemo.model.config import LlamaArch

TRACKER_FILE = "latest_checkpointed_iteration.txt"
TRAIN_STATE_FILE = "train_state.pt"
LATEST_TRAIN_STATE_FILE = "latest_train_state.pt"
RUN_CONFIG_FILE = "run_config.yaml"
PROLONG_RECORD_FILE = "prolong_record.yaml"
TOKENIZER_DIR = "tokenizer"
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def common_state(iteration: int) -> dict[str, Any]:
    """What Megatron keeps in the common (non-tensor) state: plain types only."""
    return {"checkpoint_version": 3.0, "iteration": iteration, "content_metadata": dict(CONTENT_METADATA)}


def resolve_iter_dir(path: Path) -> Path:
    """A checkpoint root (tracker file) or an iteration folder -> the torch_dist folder."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        name = tracked_iter_dir(path).name
        if not (path / name / ".metadata").is_file():
            raise ConversionError(f"{tracker} points to {name}, which is not a complete torch_dist folder")
        return path / name
    iters = sorted(p for p in path.glob("iter_*") if _ITER_RE.match(p.name) and (p / ".metadata").is_file())
    if iters:
        return iters[-1]
    raise ConversionError(f"{path}: neither a Megatron checkpoint root ({TRACKER_FILE}) nor a torch_dist folder")


def tracked_iter_dir(root: Path) -> Path:
    """The iteration folder `latest_checkpointed_iteration.txt` of a checkpoint root names."""
    tracker = Path(root) / TRACKER_FILE
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{tracker}: unreadable ({e})") from None
    name = "release" if text == "release" else iter_dir_name(int(text)) if text.isdigit() else None
    if name is None:
        raise ConversionError(f"{tracker}: unexpected content {text!r}")
    return Path(root) / name


def is_complete_iter_dir(path: Path) -> bool:
    """A finished save: megatron writes `.metadata` and then `metadata.json` last."""
    return (Path(path) / METADATA_FILE).is_file() and (Path(path) / MCORE_CONFIG_FILE).is_file()


def latest_iter_dir(root: Path, log: Callable[[str], None] | None = None, strict: bool = False) -> Path | None:
    """The iteration folder a resume reads: the one the tracker names; when the tracker is
    damaged (empty, garbage), the newest complete iter_* folder, said in a log line (`strict`:
    an error, for readers that parse the tracker themselves, e.g. Bridge). None when `root` has
    no tracker."""
    root = Path(root)
    if not (root / TRACKER_FILE).is_file():
        return None
    try:
        return tracked_iter_dir(root)
    except ConversionError as e:
        if strict:
            raise
        complete = sorted(p for p in root.glob("iter_*") if _ITER_RE.match(p.name) and is_complete_iter_dir(p))
        if not complete:
            raise ConversionError(f"{e}; no complete iter_* folder (with {METADATA_FILE} and "
                                  f"{MCORE_CONFIG_FILE}) to fall back to") from None
        if log is not None:
            log(f"[prolong] {e}: falling back to the newest complete checkpoint {complete[-1]}")
        return complete[-1]


def check_checkpoint(path: Path, log: Callable[[str], None] | None = None, strict: bool = False) -> Path:
    """Refuse a checkpoint whose pickles could run code, before megatron-core / Bridge opens it
    (they unpickle `.metadata` and `*.pt` with plain `pickle`). `path`: a checkpoint root or an
    iteration folder; returns the iteration folder checked (see `latest_iter_dir`).

    `.metadata` goes through the allow-listed unpickler; every ShardedObject record of the
    .distcp files, every `*.pt` of the iteration folder (common.pt, Bridge's train_state.pt) and
    of the root (latest_train_state.pt) through `torch.load(weights_only=True)`. Any refusal is a ConversionError naming the file.
    """
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        iter_dir, folders = path, [path]
    else:
        iter_dir = latest_iter_dir(path, log, strict) or resolve_iter_dir(path)
        folders = [iter_dir, path]
    check_object_records(iter_dir, load_metadata(iter_dir))
    for folder in folders:
        for pt in sorted(folder.glob("*.pt")):
            check_pickle_file(pt)
    return iter_dir


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` as a whole or not at all: temp file, fsync, os.replace, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bridge_run_config(root: Path) -> dict[str, Any]:
    """Bridge's run_config.yaml of the newest checkpoint in `root` (a checkpoint root with a
    tracker file, or an iteration folder), parsed with the safe YAML loader."""
    folder = latest_iter_dir(Path(root), strict=True) or Path(root)
    return _load_yaml(folder / RUN_CONFIG_FILE)


# ---------------------------------------------------------------- run_config.yaml


def _bridge_model_section(arch: LlamaArch, seq_length: int) -> dict[str, Any]:
    scaling = arch.rope_scaling
    return {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "seq_length": seq_length,
        "normalization": "RMSNorm",
        "layernorm_epsilon": arch.norm_eps,
        "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "position_embedding_type": "rope",
        "rotary_base": arch.rope_theta,
        "rotary_percent": 1.0,
        "rope_scaling": bool(scaling),
        "rope_scaling_factor": float(scaling["factor"]) if scaling else 8.0,
        "share_embeddings_and_output_weights": arch.tie_word_embeddings,
        "make_vocab_size_divisible_by": 128,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
    }


def run_config_dict(arch: LlamaArch, extras: HfExtras, source: str = "") -> dict[str, Any]:
    return {
        "model": _bridge_model_section(arch, arch.max_position_embeddings),
        "checkpoint": {
            "ckpt_format": "torch_dist",
            "save_optim": False,
            "save_rng": False,
            "fully_parallel_save": True,
        },
        "prolong": prolong_record(arch, extras, source),
    }


def prolong_record(arch: LlamaArch, extras: HfExtras | None, source: str = "") -> dict[str, Any]:
    """Our `prolong:` record; without `hf` when the bos/eos ids are not known."""
    record: dict[str, Any] = {"arch": dataclasses.asdict(arch)}
    if extras is not None:
        record["hf"] = extras.to_dict()
    record["source"] = source
    return record


def write_run_config(iter_dir: Path, arch: LlamaArch, extras: HfExtras | None = None, source: str = "") -> Path:
    """Record the model config in a checkpoint's iteration folder (also for training code)."""
    path = Path(iter_dir) / RUN_CONFIG_FILE
    with open(path, "w") as f:
        yaml.safe_dump(run_config_dict(arch, extras or HfExtras(), source), f, sort_keys=False)
    return path


def write_prolong_record(iter_dir: Path, arch: LlamaArch, extras: HfExtras | None, source: str = "") -> Path:
    """Record the model in `prolong_record.yaml` of an iteration folder, atomically (temp + rename).

    For checkpoints Megatron-Bridge saves, whose run_config.yaml is Bridge's own: `extras=None`
    records the architecture only (the ids are unknown; the export then asks for them).
    """
    path = Path(iter_dir) / PROLONG_RECORD_FILE
    record = yaml.safe_dump({"prolong": prolong_record(arch, extras, source)}, sort_keys=False)
    write_atomic(path, record.encode())
    return path


# Bridge `model:` fields a Llama-3 HF config cannot express otherwise (checked when present).
_BRIDGE_LLAMA_FIELDS = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "qk_layernorm": False,
    "position_embedding_type": "rope",
    "rotary_percent": 1.0,
}


def _refuse_non_llama(model: dict[str, Any]) -> None:
    for key, want in _BRIDGE_LLAMA_FIELDS.items():
        if key in model and model[key] != want:
            raise ConversionError(f"model.{key}={model[key]!r} is not representable as a Llama-3 HF config ({want!r})")
    act = model.get("activation_func")
    target = act.get("_target_", "") if isinstance(act, dict) else str(act or "silu")
    if not target.endswith("silu"):
        raise ConversionError(f"model.activation_func {target!r} is not representable (Llama uses silu)")


def _arch_from_bridge_model(model: dict[str, Any]) -> LlamaArch:
    """LlamaArch from a Bridge `model:` section (a checkpoint written by Bridge training)."""
    _refuse_non_llama(model)
    heads = model["num_attention_heads"]
    scaling = None
    if model.get("rope_scaling"):
        scaling = normalize_rope_scaling({"rope_type": "llama3", "factor": model.get("rope_scaling_factor", 8.0)}, "run_config")
    return LlamaArch(
        num_layers=model["num_layers"],
        hidden_size=model["hidden_size"],
        ffn_hidden_size=model["ffn_hidden_size"],
        num_attention_heads=heads,
        num_query_groups=model.get("num_query_groups") or heads,
        vocab_size=model["vocab_size"],
        norm_eps=float(model.get("layernorm_epsilon", 1e-5)),
        rope_theta=float(model.get("rotary_base", 10000)),
        rope_scaling=scaling,
        max_position_embeddings=int(model.get("seq_length", 8192)),
        tie_word_embeddings=bool(model.get("share_embeddings_and_output_weights", False)),
    )


def _load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _record_of(iter_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(file holding our record, else run_config.yaml; run_config.yaml's content; our record).

    `prolong_record.yaml` (a Bridge-trained checkpoint) wins over run_config.yaml's `prolong:`
    section (converter, CPU runner); neither file yields empty dicts.
    """
    iter_dir = Path(iter_dir)
    run_config = iter_dir / RUN_CONFIG_FILE
    cfg = _load_yaml(run_config) if run_config.is_file() else {}
    record_file = iter_dir / PROLONG_RECORD_FILE
    if record_file.is_file():
        return record_file, cfg, _load_yaml(record_file).get("prolong") or {}
    return run_config, cfg, cfg.get("prolong") or {}


def read_recorded_ids(iter_dir: Path) -> HfExtras | None:
    """The bos/eos ids recorded with a checkpoint (`prolong.hf`), None when it records none."""
    hf = _record_of(iter_dir)[2].get("hf")
    return HfExtras.from_dict(hf) if hf else None


def missing_ids_message(iter_dir: Path) -> str:
    """Why an export refuses a checkpoint without recorded ids (one line, naming the file)."""
    return (f"{_record_of(iter_dir)[0]}: records no bos/eos token ids (no prolong record, e.g. a checkpoint "
            "Megatron-Bridge saved without prolong_nemo's callback), so the export would write base Llama-3 "
            "ids; pass --ids-from HF_DIR (the model the run started from, e.g. Llama-3-8B-Instruct) "
            "or --arch-from HF_DIR")


def read_recorded_config(iter_dir: Path) -> tuple[LlamaArch, HfExtras | None]:
    """The model recorded with a checkpoint: architecture (our `prolong.arch`, else Bridge's
    `model:`) and bos/eos ids (`prolong.hf`; None when not recorded: never guessed here)."""
    path, cfg, prolong = _record_of(iter_dir)
    if not path.is_file():
        raise ConversionError(
            f"{path}: no recorded model config; pass the architecture explicitly "
            "(--arch-from HF_DIR, or --preset with --ids-from HF_DIR)"
        )
    try:
        if "arch" in prolong:
            fields = {f.name for f in dataclasses.fields(LlamaArch)}
            arch = LlamaArch(**{k: v for k, v in prolong["arch"].items() if k in fields})
        elif "model" in cfg:
            arch = _arch_from_bridge_model(cfg["model"])
        else:
            raise ConversionError(f"{path}: has neither a `prolong.arch` nor a `model` section")
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: cannot build the architecture ({e})") from None
    arch = arch.replace(rope_scaling=normalize_rope_scaling(arch.rope_scaling, str(path)))
    return arch, HfExtras.from_dict(prolong["hf"]) if prolong.get("hf") else None


def train_state(iteration: int) -> dict[str, torch.Tensor]:
    """Bridge's `TrainState.state_dict()` of a checkpoint nothing was trained into yet."""
    zero = torch.tensor(0, dtype=torch.int64)
    return {
        "step": torch.tensor(iteration, dtype=torch.int64),
        "consumed_train_samples": zero.clone(),
        "skipped_train_samples": zero.clone(),
        "consumed_valid_samples": zero.clone(),
        "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float64),
        "do_train": torch.tensor(False),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }


def write_tracker(root: Path, iteration: int) -> None:
    """Both trackers Bridge writes. Bridge (like Megatron-LM) refuses a
    `latest_checkpointed_iteration.txt` of "0" unless `latest_train_state.pt` is there: it reads
    that one first (`torch.load(weights_only=True)`, plain tensors only)."""
    root = Path(root)
    buf = io.BytesIO()
    torch.save(train_state(iteration), buf)
    write_atomic(root / iter_dir_name(iteration) / TRAIN_STATE_FILE, buf.getvalue())
    write_atomic(root / LATEST_TRAIN_STATE_FILE, buf.getvalue())
    write_atomic(root / TRACKER_FILE, str(iteration).encode())
