"""The two conversions, streaming one tensor at a time.

HF -> Megatron: every HF tensor's shape is checked against config.json before anything is
written; then each Megatron tensor (per layer: fused QKV, fused gate/up, ...) is built from
its HF tensors and appended to the dist checkpoint. Megatron -> HF: each Megatron tensor
(one layer slice) is read from its stored chunks, split, and appended to a safetensors shard
whose header was written first. Both write into a temporary sibling folder renamed at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prolong_nemo.convert import dcp_io, hf_config, mapping, megatron_io, outputs
from prolong_nemo.convert.mapping import ConversionError, TensorMap
from prolong_nemo.convert.safetensors_io import (
    PlannedTensor,
    SafetensorsFolder,
    ShardWriter,
    plan_shards,
    shard_names,
    write_index,
)
from prolong_nemo.model.config import LlamaArch

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"


@dataclass(frozen=True)
class ConversionResult:
    output: Path
    arch: LlamaArch
    tensors: int
    bytes: int
    seconds: float


# ---------------------------------------------------------------- HF -> Megatron


def _expected_hf_names(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    names = {n: mapping.hf_shape(arch, n) for m in mapping.global_maps(arch) for n in m.hf_names(None)}
    for i in range(arch.num_layers):
        for m in mapping.LAYER_MAPS:
            names.update({n: mapping.hf_shape(arch, n) for n in m.hf_names(i)})
    return names


def _check_hf_tensors(arch: LlamaArch, reader: SafetensorsFolder) -> None:
    """Every expected tensor present with its config shape; nothing unknown; ties consistent."""
    expected = _expected_hf_names(arch)
    stored = reader.tensors
    if arch.tie_word_embeddings and "lm_head.weight" in stored:
        _check_tied_head(reader)
    if not arch.tie_word_embeddings and "lm_head.weight" not in stored:
        raise ConversionError(
            f"{reader.folder}: tie_word_embeddings is false but there is no lm_head.weight "
            "(tied-embeddings mismatch between config.json and the weights)"
        )
    for name, st in stored.items():
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        if name not in expected:
            if name.endswith(mapping.HF_IGNORED_SUFFIXES):
                continue
            raise ConversionError(f"{st.file}: tensor {name} is not part of a Llama model with this config.json")
        if st.shape != expected[name]:
            raise ConversionError(f"{st.file}: tensor {name}: shape {st.shape} does not match config.json ({expected[name]})")
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ConversionError(f"{reader.folder}: {len(missing)} tensors missing from the safetensors files, e.g. {missing[:3]}")


def _check_tied_head(reader: SafetensorsFolder) -> None:
    if not torch.equal(reader.read("lm_head.weight"), reader.read("model.embed_tokens.weight")):
        raise ConversionError(
            f"{reader.tensors['lm_head.weight'].file}: tie_word_embeddings is true but lm_head.weight "
            "differs from model.embed_tokens.weight (tied-embeddings mismatch)"
        )


def _build_mcore(arch: LlamaArch, reader: SafetensorsFolder, tmap: TensorMap, layer: int | None) -> torch.Tensor:
    parts = [reader.read(n) for n in tmap.hf_names(layer)]
    if len({p.dtype for p in parts}) > 1:
        names = tmap.hf_names(layer)
        raise ConversionError(f"{reader.folder}: tensors {names} have different dtypes; cannot fuse them")
    tensor = mapping.fuse(arch, tmap, parts)
    mapping.check_shape(tensor, mapping.mcore_shape(arch, tmap), f"{tmap.mcore} (layer {layer})")
    return tensor


def _write_extra_states(writer: dcp_io.DistCheckpointWriter, arch: LlamaArch, layer: int | None) -> None:
    empty = torch.empty(0, dtype=torch.uint8)  # what TE saves without FP8 state
    if layer is None:
        for module in mapping.GLOBAL_EXTRA_STATE_MODULES:
            writer.add_object(dcp_io.object_key(f"{module}._extra_state", (0,), (1,)), empty)
        return
    for module in mapping.LAYER_EXTRA_STATE_MODULES:
        key = f"{mapping.LAYER_PREFIX}{module}._extra_state"
        writer.add_object(dcp_io.object_key(key, (layer,), (arch.num_layers,)), empty)


def hf_to_megatron(
    hf_dir: Path,
    out_root: Path,
    *,
    rope_theta: float | None = None,
    max_position_embeddings: int | None = None,
    overwrite: bool = False,
    fsync: bool = True,
    show_progress: bool = True,
) -> ConversionResult:
    """A HF Llama folder -> `<out_root>/iter_0000000` torch_dist checkpoint (TE layer-spec names).

    `rope_theta` / `max_position_embeddings` override the HF config for the target stage
    (e.g. 8e6 / 65536) and are what the checkpoint records.
    """
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    arch, extras = hf_config.arch_from_hf_config(hf_config.read_config(hf_dir), str(hf_dir / "config.json"))
    if rope_theta is not None:
        arch = arch.replace(rope_theta=float(rope_theta))
    if max_position_embeddings is not None:
        arch = arch.replace(max_position_embeddings=int(max_position_embeddings))
    reader = SafetensorsFolder(hf_dir)
    try:
        _check_hf_tensors(arch, reader)
        with outputs.atomic_output_dir(out_root, overwrite) as tmp:
            count, nbytes = _write_megatron(arch, reader, tmp, show_progress, fsync)
            iter_dir = tmp / megatron_io.iter_dir_name(0)
            megatron_io.write_run_config(iter_dir, arch, extras, source=str(hf_dir.absolute()))
            outputs.copy_tokenizer(hf_dir, iter_dir / megatron_io.TOKENIZER_DIR)
            megatron_io.write_tracker(tmp, 0)
    finally:
        reader.close()
    return ConversionResult(Path(out_root), arch, count, nbytes, time.perf_counter() - t0)


def _write_megatron(arch: LlamaArch, reader: SafetensorsFolder, root: Path, show: bool, fsync: bool) -> tuple[int, int]:
    writer = dcp_io.DistCheckpointWriter(root / megatron_io.iter_dir_name(0), fsync=fsync)
    total = sum(st.nbytes for n, st in reader.tensors.items() if n != "lm_head.weight" or not arch.tie_word_embeddings)
    bar = outputs.progress(total, "hf -> megatron", show)
    count = nbytes = 0
    try:
        for tmap in mapping.global_maps(arch):
            tensor = _build_mcore(arch, reader, tmap, None)
            writer.add_chunk(tmap.mcore, tensor, tuple(tensor.shape), (0,) * tensor.dim())
            count, nbytes = count + 1, nbytes + tensor.nbytes
            bar.update(tensor.nbytes)
        _write_extra_states(writer, arch, None)
        for layer in range(arch.num_layers):
            writer.new_file()
            for tmap in mapping.LAYER_MAPS:
                tensor = _build_mcore(arch, reader, tmap, layer).unsqueeze(0)
                shape = (arch.num_layers, *tensor.shape[1:])
                writer.add_chunk(tmap.mcore, tensor, shape, (layer,) + (0,) * (tensor.dim() - 1))
                count, nbytes = count + 1, nbytes + tensor.nbytes
                bar.update(tensor.nbytes)
                del tensor
            _write_extra_states(writer, arch, layer)
        writer.finish(megatron_io.common_state(0))
    finally:
        writer.abort()
        bar.close()
    return count, nbytes


# ---------------------------------------------------------------- Megatron -> HF


@dataclass(frozen=True)
class LayerSource:
    """Where one layer tensor lives: stacked key + layer offset, or a per-layer key."""

    keys: tuple[str, ...]  # one key, or (gate, up) for singleton-sharded fc1
    layer_axis: bool


def _layer_source(reader: dcp_io.DistCheckpointReader, tmap: TensorMap, layer: int) -> LayerSource:
    if reader.has(tmap.mcore):
        return LayerSource((tmap.mcore,), True)
    per_layer = tmap.mcore.replace(mapping.LAYER_PREFIX, f"{mapping.LAYER_PREFIX}{layer}.", 1)
    if reader.has(per_layer):
        return LayerSource((per_layer,), False)
    if tmap.kind == "fc1" and reader.has(per_layer + "_w"):  # singleton_local_shards layout
        return LayerSource((per_layer + "_w", per_layer + "_v"), False)
    raise ConversionError(f"{reader.directory}: tensor {tmap.mcore} (layer {layer}) is not in the checkpoint")


def _read_layer(arch: LlamaArch, reader: dcp_io.DistCheckpointReader, tmap: TensorMap, layer: int) -> torch.Tensor:
    src = _layer_source(reader, tmap, layer)
    want = mapping.mcore_shape(arch, tmap)
    parts = []
    for key in src.keys:
        shape = reader.global_shape(key)
        local = shape[1:] if src.layer_axis else shape
        if src.layer_axis and shape[0] != arch.num_layers:
            raise ConversionError(f"{reader.directory}: tensor {key} stacks {shape[0]} layers, config says {arch.num_layers}")
        if len(src.keys) == 1 and tuple(local) != tuple(want):
            raise ConversionError(f"{reader.directory}: tensor {key}: per-layer shape {tuple(local)} != config {want}")
        start = (layer,) + (0,) * len(local) if src.layer_axis else (0,) * len(local)
        size = (1, *local) if src.layer_axis else tuple(local)
        region = reader.read_region(key, start, size)
        parts.append(region[0] if src.layer_axis else region)
    tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
    mapping.check_shape(tensor, want, f"{reader.directory}: tensor {tmap.mcore} (layer {layer})")
    return tensor


def _read_global(arch: LlamaArch, reader: dcp_io.DistCheckpointReader, tmap: TensorMap) -> torch.Tensor:
    shape = reader.global_shape(tmap.mcore)
    want = mapping.mcore_shape(arch, tmap)
    vocab_padded = tmap in (mapping.EMBEDDING, mapping.OUTPUT) and shape[0] >= want[0] and shape[1:] == want[1:]
    if tuple(shape) != tuple(want) and not vocab_padded:
        raise ConversionError(f"{reader.directory}: tensor {tmap.mcore}: shape {tuple(shape)} != config {want}")
    # Megatron may pad the vocabulary (make_vocab_size_divisible_by x TP); HF gets the real rows.
    return reader.read_region(tmap.mcore, (0,) * len(want), want)


def _check_tie(arch: LlamaArch, reader: dcp_io.DistCheckpointReader) -> None:
    has_output = reader.has(mapping.OUTPUT.mcore)
    if arch.tie_word_embeddings and has_output:
        raise ConversionError(
            f"{reader.directory}: the recorded config ties embeddings but the checkpoint has a separate "
            "output_layer.weight (tied-embeddings mismatch)"
        )
    if not arch.tie_word_embeddings and not has_output:
        raise ConversionError(
            f"{reader.directory}: the recorded config has untied embeddings but the checkpoint has no "
            "output_layer.weight (tied-embeddings mismatch)"
        )


def _hf_plan(arch: LlamaArch, reader: dcp_io.DistCheckpointReader) -> list[PlannedTensor]:
    """HF tensors in the order they are produced; dtype = the stored Megatron tensor's."""
    plan = []
    for tmap in mapping.global_maps(arch):
        dtype = reader.dtype(tmap.mcore)
        plan += [PlannedTensor(n, dtype, mapping.hf_shape(arch, n)) for n in tmap.hf_names(None)]
    for layer in range(arch.num_layers):
        for tmap in mapping.LAYER_MAPS:
            dtype = reader.dtype(_layer_source(reader, tmap, layer).keys[0])
            plan += [PlannedTensor(n, dtype, mapping.hf_shape(arch, n)) for n in tmap.hf_names(layer)]
    return plan


def _produce_hf(arch: LlamaArch, reader: dcp_io.DistCheckpointReader):
    """Yield (hf_name, tensor) in `_hf_plan` order, one Megatron tensor in memory at a time."""
    for tmap in mapping.global_maps(arch):
        yield tmap.hf[0], _read_global(arch, reader, tmap)
    for layer in range(arch.num_layers):
        for tmap in mapping.LAYER_MAPS:
            tensor = _read_layer(arch, reader, tmap, layer)
            yield from zip(tmap.hf_names(layer), mapping.split(arch, tmap, tensor))
            del tensor


def megatron_to_hf(
    ckpt: Path,
    out_dir: Path,
    *,
    arch: LlamaArch | None = None,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    fsync: bool = True,
    show_progress: bool = True,
) -> ConversionResult:
    """A Megatron torch_dist checkpoint (root or iter folder) -> HF safetensors + config.json.

    The config is the checkpoint's own (its recorded rope_theta / max_position_embeddings), unless
    `arch` is given. Optimizer and RNG entries are never read. Tokenizer files come from
    `tokenizer_dir`, else from the checkpoint's `tokenizer/` folder when present.
    """
    t0 = time.perf_counter()
    iter_dir = megatron_io.resolve_iter_dir(Path(ckpt))
    recorded, extras = megatron_io.read_recorded_config(iter_dir) if arch is None else (arch, hf_config.HfExtras())
    reader = dcp_io.DistCheckpointReader(iter_dir)
    try:
        _check_tie(recorded, reader)
        plan = _hf_plan(recorded, reader)
        dtype = str(plan[0].dtype).replace("torch.", "")
        extras = hf_config.HfExtras(extras.bos_token_id, extras.eos_token_id, dtype)
        with outputs.atomic_output_dir(out_dir, overwrite) as tmp:
            nbytes = _write_hf(recorded, reader, plan, tmp, max_shard_bytes, show_progress, fsync)
            _write_json(tmp / "config.json", hf_config.hf_config_dict(recorded, extras))
            _write_json(tmp / "generation_config.json", hf_config.generation_config_dict(extras))
            tok = tokenizer_dir if tokenizer_dir is not None else iter_dir / megatron_io.TOKENIZER_DIR
            if tokenizer_dir is not None or tok.is_dir():
                outputs.copy_tokenizer(tok, tmp)
    finally:
        reader.close()
    return ConversionResult(Path(out_dir), recorded, len(plan), nbytes, time.perf_counter() - t0)


def _write_hf(arch, reader, plan, folder: Path, max_shard_bytes: int, show: bool, fsync: bool) -> int:
    shards = plan_shards(plan, max_shard_bytes)
    names = shard_names(len(shards))
    bar = outputs.progress(sum(t.nbytes for t in plan), "megatron -> hf", show)
    produced = _produce_hf(arch, reader)
    try:
        for shard, fname in zip(shards, names):
            writer = ShardWriter(folder / fname, shard, fsync=fsync)
            for _ in shard:
                name, tensor = next(produced)
                writer.write(name, tensor)
                bar.update(tensor.nbytes)
            writer.close()
    finally:
        bar.close()
    write_index(folder, shards, names)
    return sum(t.nbytes for t in plan)


def _write_json(path: Path, data: dict) -> None:
    import json

    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
