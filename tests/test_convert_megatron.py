"""Converted checkpoints inside a real megatron-core GPTModel (local spec, CPU, gloo world of 1).

The model requests its own sharded state dict from the checkpoint (what training does), so
these tests pin names, stacking, fusion layouts and TP slicing against megatron-core itself.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from prolong_nemo.convert import ConversionError, hf_to_megatron, megatron_to_hf, write_run_config
from prolong_nemo.convert import dcp_io, mapping
from prolong_nemo.convert.megatron_io import resolve_iter_dir
from prolong_nemo.convert.verify import (
    default_prompt,
    ensure_single_process_group,
    hf_logits,
    load_hf_model,
    load_megatron_model,
    megatron_logits,
    verify,
)
from test_convert import LLAMA31_SCALING, all_tensors, assert_bit_exact, make_hf_model

TOLERANCE = 1e-5  # fp32 logits

MCORE_VERSION = tuple(int(p) for p in __import__("megatron.core", fromlist=["__version__"]).__version__.split(".")[:2])


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    ensure_single_process_group()


@pytest.mark.parametrize(
    "changes",
    [{}, {"tie_word_embeddings": True, "rope_scaling": dict(LLAMA31_SCALING)}, {"num_key_value_heads": 1}],
    ids=["gqa", "tied-llama31", "mqa"],
)
def test_megatron_logits_equal_hf(tmp_path, changes):
    src = make_hf_model(tmp_path / "hf", dtype=torch.float32, **changes)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    # 128 positions: llama3 rope scaling moves these logits by ~1e-4 (24 positions: ~2e-5),
    # so a scaling dropped on either side cannot hide under the tolerance
    result = verify(src, tmp_path / "mg", default_prompt(256, length=128))
    assert result.notes == () and result.tokens == 128
    assert result.max_abs_logit_diff <= TOLERANCE
    # and the logits are real: a different prompt changes them
    model, _ = load_megatron_model(tmp_path / "mg")
    a, b = (megatron_logits(model, default_prompt(256, seed=s)) for s in (0, 1))
    assert (a - b).abs().max() > 1e-2


def test_verify_command(tmp_path, capsys):
    from prolong_nemo.cli import main as cli_main

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    assert cli_main(["convert", "verify", str(src), str(tmp_path / "mg")]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff| = " in out and "(OK, tolerance 1e-05)" in out
    assert cli_main(["convert", "verify", str(src), str(tmp_path / "mg"), "--tolerance", "-1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_refuses_a_different_architecture(tmp_path):
    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    other = make_hf_model(tmp_path / "other", dtype=torch.float32, intermediate_size=128)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    with pytest.raises(ConversionError, match=r"are different architectures \(ffn_hidden_size\)"):
        verify(other, tmp_path / "mg")


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker, 0o777, True))


def test_verify_never_unpickles_stored_objects(tmp_path, monkeypatch):
    """A hostile `_extra_state` payload in the checkpoint is never deserialized by verify
    (megatron's own load would: DCP reads objects with weights_only=False)."""
    from megatron.core import dist_checkpointing

    marker = tmp_path / "unpickled"
    original = dcp_io.DistCheckpointWriter.add_object
    monkeypatch.setattr(dcp_io.DistCheckpointWriter, "add_object", lambda self, key, data: original(
        self, key, _Boom(str(marker)) if "_extra_state" in key else data))
    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    monkeypatch.undo()
    assert verify(src, tmp_path / "mg").max_abs_logit_diff <= TOLERANCE
    assert not marker.exists()
    model, _ = load_megatron_model(tmp_path / "mg")  # control: the payload is live
    dist_checkpointing.load(model.sharded_state_dict(), str(resolve_iter_dir(tmp_path / "mg")))
    assert marker.exists()


def test_wrong_qkv_layout_is_detected(tmp_path, monkeypatch):
    """Negative control: a plain [q; k; v] concatenation must not pass the parity check."""
    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    original = mapping.row_blocks

    def naive(arch, tmap):
        if tmap.kind != "qkv":
            return original(arch, tmap)
        rows = [arch.num_attention_heads * arch.head_dim] + [arch.num_query_groups * arch.head_dim] * 2
        return [mapping.RowBlock(i, 0, n) for i, n in enumerate(rows)]

    monkeypatch.setattr(mapping, "row_blocks", naive)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    assert verify(src, tmp_path / "mg").max_abs_logit_diff > 1e-3


def test_rope_theta_override_is_applied_on_both_sides(tmp_path):
    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", rope_theta=8e6, show_progress=False)
    model, arch = load_megatron_model(tmp_path / "mg")
    assert arch.rope_theta == 8e6
    tokens = default_prompt(256, length=64)
    plain, _ = load_hf_model(src)  # the source's own rope_theta (500k)
    assert (megatron_logits(model, tokens) - hf_logits(plain, tokens)).abs().max() > 1e-4
    result = verify(src, tmp_path / "mg")
    assert result.max_abs_logit_diff <= TOLERANCE and "rope differs" in result.notes[0]


def _tp_load(iter_dir, key_tensors):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(key_tensors, str(iter_dir), validate_access_integrity=False)


def test_tensor_parallel_ranks_read_their_own_heads(tmp_path):
    """Requests as a TP=2 run makes them: rank r gets query groups r, and gate/up block r.

    One process has to request every (layer, rank) cell of the grid (torch's ShardedTensor
    wants all shards of a world of one), but each request is checked on its own.
    """
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    layers, tp = 3, 2
    src = make_hf_model(tmp_path / "hf", num_hidden_layers=layers)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    hf = all_tensors(src)

    def request(key, rows_cols, layer, axis, rank):
        return ShardedTensor.from_rank_offsets(
            f"decoder.layers.{key}", torch.empty(rows_cols, dtype=torch.bfloat16),
            (0, layer, layers), (axis, rank, tp), replica_id=0, prepend_axis_num=1,
        )

    wanted = {}
    for layer in range(layers):
        for rank in range(tp):
            fc1 = request("mlp.linear_fc1.weight", (96, 64), layer, 1, rank)
            wanted[(layer, rank)] = {
                "qkv": request("self_attention.linear_qkv.weight", (64, 64), layer, 1, rank),
                "proj": request("self_attention.linear_proj.weight", (64, 32), layer, 2, rank),
                "fc1": apply_swiglu_sharded_factory(fc1, [(0, layer, layers)]),
            }
    got = _tp_load(resolve_iter_dir(tmp_path / "mg"), {f"{k[0]}.{k[1]}": v for k, v in wanted.items()})
    for (layer, rank) in wanted:
        part, p = got[f"{layer}.{rank}"], f"model.layers.{layer}."
        q, k, v = (hf[f"{p}self_attn.{n}_proj.weight"] for n in "qkv")
        # group `rank`: q heads 2*rank, 2*rank+1 (32 rows), then its k head and v head (16 rows each)
        want_qkv = torch.cat([q[32 * rank: 32 * rank + 32], k[16 * rank: 16 * rank + 16], v[16 * rank: 16 * rank + 16]])
        assert torch.equal(part["qkv"], want_qkv)
        gate, up = hf[f"{p}mlp.gate_proj.weight"], hf[f"{p}mlp.up_proj.weight"]
        assert torch.equal(part["fc1"], torch.cat([gate[48 * rank: 48 * rank + 48], up[48 * rank: 48 * rank + 48]]))
        assert torch.equal(part["proj"], hf[f"{p}self_attn.o_proj.weight"][:, 32 * rank: 32 * rank + 32])


def _optimizer_entries(sharded: dict) -> dict:
    """Fake optimizer moments sharded like their params (the fully-reshardable layout)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out = {}
    for name, sh in sharded.items():
        if isinstance(sh, ShardedTensor):
            out[name] = dataclasses.replace(sh, key=f"optimizer.state.exp_avg.{sh.key}", data=torch.randn_like(sh.data))
    return out


def test_training_checkpoint_with_optimizer_exports_its_own_config(tmp_path, monkeypatch):
    """A checkpoint as training writes it (iter_0000123, optimizer state) -> HF with ITS rope/context."""
    from megatron.core import dist_checkpointing

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "init", show_progress=False)
    model, arch = load_megatron_model(tmp_path / "init")
    with torch.no_grad():  # "training" changed the weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = arch.replace(rope_theta=8e6, max_position_embeddings=65536)
    root, iter_dir = tmp_path / "run", tmp_path / "run" / "iter_0000123"
    iter_dir.mkdir(parents=True)
    sharded = model.sharded_state_dict()
    dist_checkpointing.save({"model": sharded, "optimizer": _optimizer_entries(sharded),
                             "iteration": 123}, str(iter_dir))
    (root / "latest_checkpointed_iteration.txt").write_text("123")
    write_run_config(iter_dir, trained)

    loaded_keys = []
    original = dcp_io.DistCheckpointReader._load_record
    monkeypatch.setattr(dcp_io.DistCheckpointReader, "_load_record",
                        lambda self, key, info: loaded_keys.append(key) or original(self, key, info))
    megatron_to_hf(root, tmp_path / "out", show_progress=False)
    assert loaded_keys and not [k for k in loaded_keys if k.startswith("optimizer")]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["rope_theta"], config["max_position_embeddings"]) == (8e6, 65536)
    # the exported weights are the trained ones, and HF computes Megatron's logits
    mg, _ = load_megatron_model(root)
    hf, _ = load_hf_model(tmp_path / "out")
    tokens = default_prompt(256, length=32)
    assert (megatron_logits(mg, tokens) - hf_logits(hf, tokens)).abs().max() <= TOLERANCE
    # and it converts back bit-exactly
    hf_to_megatron(tmp_path / "out", tmp_path / "again", show_progress=False)
    megatron_to_hf(tmp_path / "again", tmp_path / "out2", show_progress=False)
    assert_bit_exact(all_tensors(tmp_path / "out"), all_tensors(tmp_path / "out2"))


def test_padded_vocabulary_is_trimmed_on_export(tmp_path):
    """Megatron pads the vocab (make_vocab_size_divisible_by x TP): HF gets the real rows."""
    from megatron.core import dist_checkpointing

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32, vocab_size=250)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    model, arch = load_megatron_model(tmp_path / "mg")
    padded = arch.replace(vocab_size=256)
    from prolong_nemo.model.builder import build_gpt_model

    big = build_gpt_model(padded, 64, backend="local")
    state = {k: v for k, v in model.state_dict().items()}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        state[name] = torch.cat([state[name], torch.zeros(6, 64)])
    big.load_state_dict(state, strict=True)
    iter_dir = tmp_path / "padded" / "iter_0000001"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save({"model": big.sharded_state_dict()}, str(iter_dir))
    write_run_config(iter_dir, arch)  # the real vocabulary is 250
    megatron_to_hf(iter_dir, tmp_path / "out", show_progress=False)
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))
    write_run_config(iter_dir, arch.replace(vocab_size=300))
    with pytest.raises(ConversionError, match=r"embedding.word_embeddings.weight: shape \(256, 64\)"):
        megatron_to_hf(iter_dir, tmp_path / "out3", show_progress=False)


def test_checkpoint_holds_exactly_what_the_model_requests(tmp_path):
    """Strict key check against megatron-core: nothing the model asks for is absent; the only
    extras are the two `_extra_state` objects a TE-spec model adds (attention, final norm)."""
    from megatron.core import dist_checkpointing

    from prolong_nemo.model.builder import build_gpt_model

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    model, arch = load_megatron_model(tmp_path / "mg")
    fresh = build_gpt_model(arch, 64, backend="local")
    _, missing, unexpected = dist_checkpointing.load(
        {"model": fresh.sharded_state_dict()}, str(resolve_iter_dir(tmp_path / "mg")), strict="return_all"
    )
    te_extras = {"decoder.final_layernorm._extra_state", "decoder.layers.self_attention.core_attention._extra_state"}
    if MCORE_VERSION >= (0, 19):
        assert unexpected == set()
        assert missing == te_extras
    else:  # keeps the common state in common.pt only; the "common_state" object we also write
        # for 0.19 readers is the one difference (0.17/0.18 also name the two sets differently)
        assert missing | unexpected == te_extras | {"common_state"}


@pytest.mark.skipif(MCORE_VERSION < (0, 19), reason="megatron-core < 0.19 reads the common state from common.pt only")
def test_common_state_is_readable_both_ways(tmp_path):
    """megatron-core reads the common state from `common.pt` (older versions; 0.19 when present)
    or from the "common_state" object (0.19 without `common.pt`): both copies must load."""
    from megatron.core import dist_checkpointing

    from prolong_nemo.convert.megatron_io import common_state

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    iter_dir = resolve_iter_dir(tmp_path / "mg")
    assert dist_checkpointing.load_common_state_dict(iter_dir) == common_state(0)
    assert torch.load(iter_dir / dcp_io.COMMON_FILE, weights_only=True) == common_state(0)
    (iter_dir / dcp_io.COMMON_FILE).unlink()
    assert dist_checkpointing.load_common_state_dict(iter_dir) == common_state(0)
    assert verify(src, tmp_path / "mg").max_abs_logit_diff <= TOLERANCE


def _reshard_worker(rank: int, world: int, port: int, tp: int, pp: int, src: str, out: str) -> None:
    """One rank of a TP x PP run: load the converted checkpoint, save it as training does."""
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from prolong_nemo.convert.megatron_io import read_recorded_config
    from prolong_nemo.convert.verify import _weights_only
    from prolong_nemo.cpu_compat import apply_cpu_patches
    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.model.megatron_config import ParallelSizes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    apply_cpu_patches(force=True)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    iter_dir = resolve_iter_dir(src)
    arch = read_recorded_config(iter_dir)[0]
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model = build_gpt_model(arch, 64, backend="local", parallel=ParallelSizes(tp=tp, pp=pp),
                            pre_process=stage == 0, post_process=stage == pp - 1)
    state = dist_checkpointing.load({"model": _weights_only(model.sharded_state_dict())}, str(iter_dir))
    model.load_state_dict(state["model"], strict=True)
    sharded = model.sharded_state_dict()
    dist_checkpointing.save({"model": sharded, "optimizer": _optimizer_entries(sharded), "iteration": 7}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_export_of_a_checkpoint_saved_by_several_ranks(tmp_path, tp, pp):
    """megatron-core itself saves the converted weights from 2 ranks (TP-split chunks, or layers
    and embedding / output layer on different ranks; one .distcp file per rank, optimizer
    entries beside the model): the export is bit-exact to the source."""
    import torch.multiprocessing as mp
    from model_fixtures import _free_port

    from prolong_nemo.convert.megatron_io import read_recorded_config

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32, num_hidden_layers=4)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    iter_dir = tmp_path / "run" / "iter_0000007"
    iter_dir.mkdir(parents=True)
    mp.spawn(_reshard_worker, args=(2, _free_port(), tp, pp, str(tmp_path / "mg"), str(iter_dir)), nprocs=2, join=True)
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("7")
    write_run_config(iter_dir, read_recorded_config(resolve_iter_dir(tmp_path / "mg"))[0])
    reader = dcp_io.DistCheckpointReader(iter_dir)
    files = {info.relative_path for info in reader.metadata.storage_data.values()}
    assert len(files) >= 2
    qkv = reader.metadata.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == 4 * tp
    megatron_to_hf(tmp_path / "run", tmp_path / "out", show_progress=False)
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))


def test_export_of_a_singleton_local_shards_checkpoint(tmp_path):
    """megatron-core's other layout (content metadata singleton_local_shards): per-layer keys
    and fc1 stored as separate `_w` / `_v` halves; the export is bit-exact to the source."""
    from megatron.core import dist_checkpointing

    from prolong_nemo.convert.megatron_io import read_recorded_config

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    model, _ = load_megatron_model(tmp_path / "mg")
    sharded = model.sharded_state_dict(metadata={"singleton_local_shards": True, "dp_cp_group": None})
    iter_dir = tmp_path / "single" / "iter_0000002"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save({"model": sharded}, str(iter_dir))
    keys = set(dcp_io.DistCheckpointReader(iter_dir).tensor_keys())
    assert {"decoder.layers.1.mlp.linear_fc1.weight_w", "decoder.layers.1.mlp.linear_fc1.weight_v",
            "decoder.layers.1.self_attention.linear_qkv.weight"} <= keys
    write_run_config(iter_dir, read_recorded_config(resolve_iter_dir(tmp_path / "mg"))[0])
    megatron_to_hf(iter_dir, tmp_path / "out", show_progress=False)
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))


def test_converted_checkpoint_loads_into_a_padded_vocabulary(tmp_path):
    """Bridge pads the vocabulary to a multiple of 128 x TP: the converted (unpadded) embedding
    and output layer still load (megatron-core allows that shape mismatch), real rows intact."""
    from megatron.core import dist_checkpointing

    from prolong_nemo.convert.megatron_io import read_recorded_config
    from prolong_nemo.convert.verify import _weights_only
    from prolong_nemo.model.builder import build_gpt_model

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32, vocab_size=250)
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    iter_dir = resolve_iter_dir(tmp_path / "mg")
    model = build_gpt_model(read_recorded_config(iter_dir)[0].replace(vocab_size=256), 64, backend="local")
    state = dist_checkpointing.load({"model": _weights_only(model.sharded_state_dict())}, str(iter_dir))["model"]
    hf = all_tensors(src)
    for mcore, name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"), ("output_layer.weight", "lm_head.weight")):
        assert state[mcore].shape == (256, 64) and torch.equal(state[mcore][:250], hf[name])
