"""The two conversions, streaming one tensor at a time.

HF -> Megatron: every HF tensor's shape is checked against config.json before anything is
written; then each Megatron tensor (per layer: QKV interleaved per query group, gate/up, ...)
is assembled by reading its row blocks straight from the HF files into one reused buffer and
appended to the dist checkpoint as one record. Megatron -> HF: all shapes are checked first;
then each Megatron tensor (one layer slice) has its row blocks copied file-to-file into the
HF tensors of a safetensors shard whose header was written first (through memory when the
stored record cannot be mapped, or when `dtype` casts it: one tensor slice at a time, never the
whole model). Both write a temporary sibling folder renamed at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prolong_nemo.convert import dcp_io, hf_config, mapping, megatron_io, outputs
from prolong_nemo.convert.mapping import ConversionError, TensorMap
from prolong_nemo.convert.safetensors_io import (
    Arena,
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


def _fill_mcore(arch: LlamaArch, reader: SafetensorsFolder, tmap: TensorMap, layer: int | None, arena: Arena) -> torch.Tensor:
    """The Megatron tensor, its rows read straight from the HF files into the arena."""
    names = tmap.hf_names(layer)
    dtypes = {reader.stored(n).dtype for n in names}
    if len(dtypes) > 1:
        raise ConversionError(f"{reader.folder}: tensors {names} have different dtypes; cannot fuse them")
    out = arena.tensor(dtypes.pop(), mapping.mcore_shape(arch, tmap))
    row = 0
    for block in mapping.row_blocks(arch, tmap):
        reader.read_rows_into(names[block.part], block.first, block.count, out[row: row + block.count])
        row += block.count
    return out


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
    arch, extras = hf_config.read_hf_model(hf_dir)  # extras: ids, dtype, generation_config.json
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
    arena = Arena()  # each tensor is a view of it, valid until the next _fill_mcore
    try:
        for tmap in mapping.global_maps(arch):
            tensor = _fill_mcore(arch, reader, tmap, None, arena)
            writer.add_chunk(tmap.mcore, tensor, tuple(tensor.shape), (0,) * tensor.dim())
            count, nbytes = count + 1, nbytes + tensor.nbytes
            bar.update(tensor.nbytes)
        _write_extra_states(writer, arch, None)
        for layer in range(arch.num_layers):
            writer.new_file()
            for tmap in mapping.LAYER_MAPS:
                tensor = _fill_mcore(arch, reader, tmap, layer, arena).unsqueeze(0)
                shape = (arch.num_layers, *tensor.shape[1:])
                writer.add_chunk(tmap.mcore, tensor, shape, (layer,) + (0,) * (tensor.dim() - 1))
                count, nbytes = count + 1, nbytes + tensor.nbytes
                bar.update(tensor.nbytes)
            _write_extra_states(writer, arch, layer)
        writer.finish(megatron_io.common_state(0))
    finally:
        writer.abort()
        bar.close()
    return count, nbytes


# ---------------------------------------------------------------- Megatron -> HF


@dataclass(frozen=True)
class Segment:
    """Rows [row, row + size[0 or 1]) of a Megatron tensor, stored at `start` of key `key`."""

    key: str
    start: tuple[int, ...]
    size: tuple[int, ...]  # with the leading layer axis (1) for stacked keys
    row: int
    stacked: bool

    @property
    def rows(self) -> int:
        return self.size[1] if self.stacked else self.size[0]


@dataclass(frozen=True)
class ExportJob:
    """One Megatron tensor (a layer slice or a global) and the HF tensors it becomes."""

    tmap: TensorMap
    layer: int | None
    hf: list[PlannedTensor]


def _layer_segments(arch: LlamaArch, reader: dcp_io.DistCheckpointReader, tmap: TensorMap, layer: int) -> list[Segment]:
    """Stacked key (the default), per-layer keys, or singleton-sharded fc1 halves."""
    want = mapping.mcore_shape(arch, tmap)
    if reader.has(tmap.mcore):
        shape = reader.global_shape(tmap.mcore)
        if tuple(shape) != (arch.num_layers, *want):
            raise ConversionError(
                f"{reader.directory}: tensor {tmap.mcore}: shape {tuple(shape)} != config {(arch.num_layers, *want)}"
            )
        return [Segment(tmap.mcore, (layer,) + (0,) * len(want), (1, *want), 0, True)]
    per_layer = tmap.mcore.replace(mapping.LAYER_PREFIX, f"{mapping.LAYER_PREFIX}{layer}.", 1)
    keys = [per_layer]
    if not reader.has(per_layer) and tmap.kind == "fc1" and reader.has(per_layer + "_w"):
        keys = [per_layer + "_w", per_layer + "_v"]  # singleton_local_shards layout
    if not all(reader.has(k) for k in keys):
        raise ConversionError(f"{reader.directory}: tensor {tmap.mcore} (layer {layer}) is not in the checkpoint")
    segments, row = [], 0
    for key in keys:
        shape = tuple(reader.global_shape(key))
        expect = (want[0] // len(keys), *want[1:])
        if shape != expect:
            raise ConversionError(f"{reader.directory}: tensor {key}: shape {shape} != config {expect}")
        segments.append(Segment(key, (0,) * len(shape), shape, row, False))
        row += shape[0]
    return segments


def _global_segments(arch: LlamaArch, reader: dcp_io.DistCheckpointReader, tmap: TensorMap) -> list[Segment]:
    shape = tuple(reader.global_shape(tmap.mcore))
    want = mapping.mcore_shape(arch, tmap)
    # Megatron may pad the vocabulary (make_vocab_size_divisible_by x TP); HF gets the real rows.
    vocab_padded = tmap in (mapping.EMBEDDING, mapping.OUTPUT) and shape[0] >= want[0] and shape[1:] == want[1:]
    if shape != tuple(want) and not vocab_padded:
        raise ConversionError(f"{reader.directory}: tensor {tmap.mcore}: shape {shape} != config {want}")
    return [Segment(tmap.mcore, (0,) * len(want), tuple(want), 0, False)]


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


def _segments(arch, reader, job: ExportJob) -> list[Segment]:
    if job.layer is None:
        return _global_segments(arch, reader, job.tmap)
    return _layer_segments(arch, reader, job.tmap, job.layer)


def _export_jobs(arch: LlamaArch, reader: dcp_io.DistCheckpointReader,
                 cast: torch.dtype | None = None) -> list[ExportJob]:
    """Every Megatron tensor in HF order (as `cast`, else its stored dtype); validates shapes
    before anything is written, and refuses model tensors the export has no place for (biases,
    QK norms, ...) instead of silently dropping them. Other keys (optimizer state, ...) are never read."""
    jobs, used = [], set()
    for layer, tmap in [(None, m) for m in mapping.global_maps(arch)] + [
        (i, m) for i in range(arch.num_layers) for m in mapping.LAYER_MAPS
    ]:
        job = ExportJob(tmap, layer, [])
        segments = _segments(arch, reader, job)
        used.update(seg.key for seg in segments)
        dtypes = {reader.dtype(seg.key) for seg in segments}
        if len(dtypes) != 1:
            raise ConversionError(f"{reader.directory}: tensor {tmap.mcore} (layer {layer}) mixes dtypes {dtypes}")
        dtype = cast or dtypes.pop()
        job.hf.extend(PlannedTensor(n, dtype, mapping.hf_shape(arch, n)) for n in tmap.hf_names(layer))
        jobs.append(job)
    unknown = sorted(k for k in reader.tensor_keys() if k.startswith(mapping.MODEL_PREFIXES) and k not in used)
    if unknown:
        raise ConversionError(
            f"{reader.directory}: model tensors with no place in a Llama-3 HF model: {unknown[:4]}"
            f"{' ...' if len(unknown) > 4 else ''} (the export would drop them)"
        )
    return jobs


def _export(arch: LlamaArch, reader: dcp_io.DistCheckpointReader, job: ExportJob, writer: ShardWriter) -> None:
    """Move one Megatron tensor's rows into its HF tensors: a file-to-file copy per row block
    when the rows sit contiguously in one stored record of the HF dtype, else through memory
    (one segment, cast per row block)."""
    names = [t.name for t in job.hf]
    shape = mapping.mcore_shape(arch, job.tmap)
    dtype = job.hf[0].dtype
    row_bytes = torch.Size(shape[1:]).numel() * dtype.itemsize
    blocks, at = [], 0
    for b in mapping.row_blocks(arch, job.tmap):
        blocks.append((at, b))
        at += b.count
    for seg in _segments(arch, reader, job):
        where = reader.locate(seg.key, seg.start, seg.size) if reader.dtype(seg.key) == dtype else None
        data = None if where is not None else reader.read_region(seg.key, seg.start, seg.size).reshape(seg.rows, -1)
        for m0, b in blocks:  # intersect the segment's rows with each HF row block
            lo, hi = max(m0, seg.row), min(m0 + b.count, seg.row + seg.rows)
            if lo >= hi:
                continue
            dst = (b.first + lo - m0) * row_bytes
            if where is not None:
                writer.copy_rows(names[b.part], dst, where[0], where[1] + (lo - seg.row) * row_bytes, (hi - lo) * row_bytes)
            else:
                writer.write_at(names[b.part], dst, data[lo - seg.row: hi - seg.row].to(dtype))
        del data


def megatron_to_hf(
    ckpt: Path,
    out_dir: Path,
    *,
    arch: LlamaArch | None = None,
    extras: hf_config.HfExtras | None = None,
    tokenizer_dir: Path | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    fsync: bool = True,
    show_progress: bool = True,
) -> ConversionResult:
    """A Megatron torch_dist checkpoint (root or iter folder) -> HF safetensors + config.json.

    The config is the checkpoint's own (its recorded rope_theta / max_position_embeddings), unless
    `arch` is given; bos/eos ids are `extras`, else those recorded with the checkpoint. A checkpoint
    that records none is refused (ConversionError) rather than exported with base Llama-3 ids;
    generation_config.json is the one recorded with the ids (hf_config.generation_config_dict).
    `dtype` ("bfloat16", "float16", "float32", a torch dtype; None / "auto": the stored dtype)
    is what the safetensors hold and config.json's "dtype" says, cast while streaming.
    Optimizer and RNG entries are never read. Tokenizer files come from `tokenizer_dir`, else
    from the checkpoint's `tokenizer/` folder when present, else the offline Llama-3 tokenizer is
    converted into the export (outputs.export_tokenizer).
    """
    t0 = time.perf_counter()
    cast = hf_config.export_dtype(dtype)
    iter_dir = megatron_io.resolve_iter_dir(Path(ckpt))
    if arch is None:
        recorded, own = megatron_io.read_recorded_config(iter_dir)
    else:
        recorded, own = arch, None if extras is not None else megatron_io.read_recorded_ids(iter_dir)
    extras = extras or own
    if extras is None:
        raise ConversionError(megatron_io.missing_ids_message(iter_dir))
    reader = dcp_io.DistCheckpointReader(iter_dir)
    try:
        _check_tie(recorded, reader)
        jobs = _export_jobs(recorded, reader, cast)
        extras = replace(extras, torch_dtype=str(jobs[0].hf[0].dtype).replace("torch.", ""))
        with outputs.atomic_output_dir(out_dir, overwrite) as tmp:
            nbytes = _write_hf(recorded, reader, jobs, tmp, max_shard_bytes, show_progress, fsync)
            _write_json(tmp / "config.json", hf_config.hf_config_dict(recorded, extras))
            _write_json(tmp / "generation_config.json", hf_config.generation_config_dict(extras))
            outputs.export_tokenizer(iter_dir / megatron_io.TOKENIZER_DIR if tokenizer_dir is None else tokenizer_dir,
                                     tmp, required=tokenizer_dir is not None, vocab_size=recorded.vocab_size,
                                     eos_token_id=extras.eos_token_id)
    finally:
        reader.close()
    count = sum(len(j.hf) for j in jobs)
    return ConversionResult(Path(out_dir), recorded, count, nbytes, time.perf_counter() - t0)


def _write_hf(arch, reader, jobs: list[ExportJob], folder: Path, max_shard_bytes: int, show: bool, fsync: bool) -> int:
    shards = plan_shards([j.hf for j in jobs], max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(t.nbytes for j in jobs for t in j.hf)
    bar = outputs.progress(total, "megatron -> hf", show)
    pending = iter(jobs)
    try:
        for shard, fname in zip(shards, names):
            writer = ShardWriter(folder / fname, shard, fsync=fsync)
            left = len(shard)
            while left:
                job = next(pending)
                _export(arch, reader, job, writer)
                left -= len(job.hf)
                bar.update(sum(t.nbytes for t in job.hf))
            writer.close()
    finally:
        bar.close()
    write_index(folder, shards, names)
    return total


def _write_json(path: Path, data: dict) -> None:
    import json

    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
