"""HF <-> Megatron conversion: bit-exact round trips, configs, and every refused input.

Tiny random Llama-3-architecture models are built offline with transformers. The tests that
load the checkpoint into a real megatron-core GPTModel live in test_convert_megatron.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prolong_nemo.cli import main as cli_main
from prolong_nemo.convert import ConversionError, hf_to_megatron, megatron_to_hf
from prolong_nemo.convert import dcp_io
from prolong_nemo.convert.hf_config import arch_from_hf_config
from prolong_nemo.convert.megatron_io import read_recorded_config, resolve_iter_dir
from prolong_nemo.errors import UserError

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2,
)
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def make_hf_model(folder: Path, dtype=torch.bfloat16, seed: int = 0, shard: str = "40KB", **changes) -> Path:
    """A random tiny LlamaForCausalLM saved as (sharded) safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **changes})
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # make norms non-trivial so a dropped norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    return folder


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))  # the safetensors library itself validates the files
    return out


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def quiet(**kw):
    return dict(show_progress=False, **kw)


# ---------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact_and_records_target_rope(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded input with an index
    res = hf_to_megatron(src, tmp_path / "mg", rope_theta=8e6, max_position_embeddings=65536, **quiet())
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "0"
    iter_dir = resolve_iter_dir(tmp_path / "mg")
    assert iter_dir.name == "iter_0000000"
    for name in (".metadata", "metadata.json", "common.pt", "run_config.yaml"):
        assert (iter_dir / name).is_file(), name
    arch, _ = read_recorded_config(iter_dir)
    assert (arch.rope_theta, arch.max_position_embeddings) == (8e6, 65536) == (res.arch.rope_theta, 65536)

    out = megatron_to_hf(tmp_path / "mg", tmp_path / "out", max_shard_bytes=60_000, **quiet())
    assert_bit_exact(all_tensors(src), all_tensors(out.output))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == 8e6 and config["max_position_embeddings"] == 65536
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 8e6}
    assert config["dtype"] == "bfloat16" and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (tmp_path / "out" / "generation_config.json").is_file()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(all_tensors(src))


def test_copy_and_memory_paths_agree(tmp_path, monkeypatch):
    """Export copies row blocks file-to-file when records are plain; the in-memory fallback
    (records it cannot map, e.g. TP-split columns) must produce the same bytes."""
    src = make_hf_model(tmp_path / "hf", rope_scaling=dict(LLAMA31_SCALING))
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    located = []
    original = dcp_io.DistCheckpointReader.locate
    monkeypatch.setattr(dcp_io.DistCheckpointReader, "locate",
                        lambda self, *a: located.append(original(self, *a)) or located[-1])
    megatron_to_hf(tmp_path / "mg", tmp_path / "fast", **quiet())
    assert located and all(loc is not None for loc in located)
    monkeypatch.setattr(dcp_io.DistCheckpointReader, "locate", lambda self, *a: None)
    megatron_to_hf(tmp_path / "mg", tmp_path / "slow", **quiet())
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "fast"))
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "slow"))


def test_megatron_layout_is_stacked_with_te_names(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    reader = dcp_io.DistCheckpointReader(resolve_iter_dir(tmp_path / "mg"))
    shapes = {k: reader.global_shape(k) for k in reader.tensor_keys()}
    assert shapes == {
        "embedding.word_embeddings.weight": (256, 64),
        "decoder.final_layernorm.weight": (64,),
        "output_layer.weight": (256, 64),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (2, 64),
        "decoder.layers.self_attention.linear_qkv.weight": (2, (4 + 2 * 2) * 16, 64),
        "decoder.layers.self_attention.linear_proj.weight": (2, 64, 64),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 64),
        "decoder.layers.mlp.linear_fc1.weight": (2, 2 * 96, 64),
        "decoder.layers.mlp.linear_fc2.weight": (2, 64, 96),
    }
    hf = all_tensors(src)
    qkv = reader.read_region("decoder.layers.self_attention.linear_qkv.weight", (1, 0, 0), (1, 128, 64))[0]
    q, k, v = (hf[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    # query group 1 = q heads 2..3, then k head 1, then v head 1
    assert torch.equal(qkv[64:96], q[32:64]) and torch.equal(qkv[96:112], k[16:32]) and torch.equal(qkv[112:], v[16:32])
    norm = reader.read_region("decoder.layers.mlp.linear_fc1.layer_norm_weight", (0, 0), (1, 64))[0]
    assert torch.equal(norm, hf["model.layers.0.post_attention_layernorm.weight"])
    objects = [k for k, v in reader.metadata.state_dict_metadata.items() if not hasattr(v, "chunks")]
    assert "decoder.layers.self_attention.core_attention._extra_state/shard_1_2" in objects
    assert "common_state/shard_0_1" in objects


def load_without_warnings(folder: Path):
    """LlamaForCausalLM.from_pretrained, asserting no missing/unexpected keys and no warnings."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        model, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    return model


def test_exported_folder_loads_in_transformers_without_warnings(tmp_path):
    from transformers import LlamaForCausalLM

    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    model = load_without_warnings(tmp_path / "out")
    ref = LlamaForCausalLM.from_pretrained(src)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref(tokens).logits)


def test_llama31_rope_scaling_round_trips(tmp_path):
    from transformers import LlamaConfig

    # max_position_embeddings above original_max_position_embeddings, as in real Llama-3.1
    src = make_hf_model(tmp_path / "hf", rope_scaling=dict(LLAMA31_SCALING), max_position_embeddings=131072)
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    assert read_recorded_config(resolve_iter_dir(tmp_path / "mg"))[0].rope_scaling == LLAMA31_SCALING
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    config = LlamaConfig.from_pretrained(tmp_path / "out")
    assert config.rope_scaling == LLAMA31_SCALING and config.rope_theta == 500000.0
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["rope_parameters"] == {**LLAMA31_SCALING, "rope_theta": 500000.0}
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))
    load_without_warnings(tmp_path / "out")


def test_tied_embeddings_round_trip(tmp_path):
    src = make_hf_model(tmp_path / "hf", tie_word_embeddings=True)
    assert "lm_head.weight" not in all_tensors(src)
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    reader = dcp_io.DistCheckpointReader(resolve_iter_dir(tmp_path / "mg"))
    assert not reader.has("output_layer.weight")
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    model = load_without_warnings(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_transformers5_config_shape_is_read():
    cfg = {**TINY, "model_type": "llama", "rope_parameters": {**LLAMA31_SCALING, "rope_theta": 8e6}}
    del cfg["rope_theta"]
    arch, _ = arch_from_hf_config(cfg)
    assert arch.rope_theta == 8e6 and arch.rope_scaling == LLAMA31_SCALING
    arch, _ = arch_from_hf_config({**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 1.28e8}})
    assert arch.rope_theta == 1.28e8 and arch.rope_scaling is None


def test_tokenizer_files_are_carried(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    (src / "tokenizer.json").write_text('{"model": "x"}')
    (src / "tokenizer_config.json").write_text("{}")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    assert (resolve_iter_dir(tmp_path / "mg") / "tokenizer" / "tokenizer.json").is_file()
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": "x"}'
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text('{"model": "y"}')
    megatron_to_hf(tmp_path / "mg", tmp_path / "out2", tokenizer_dir=other, **quiet())
    assert (tmp_path / "out2" / "tokenizer.json").read_text() == '{"model": "y"}'
    (tmp_path / "empty").mkdir()  # a named folder without tokenizer files is a mistake, not "none"
    with pytest.raises(ConversionError, match="empty: no tokenizer files"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out3", tokenizer_dir=tmp_path / "empty", **quiet())
    assert not (tmp_path / "out3").exists()


def test_tokenizer_symlink_out_of_the_folder_is_refused(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    secret = tmp_path / "secret.txt"  # stands for /etc/passwd
    secret.write_text("root:x:0:0")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ConversionError, match=rf"^{src / 'tokenizer.json'}: a symbolic link to {secret}"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    assert not (tmp_path / "mg").exists()
    (src / "tokenizer.json").unlink()
    (src / "original").symlink_to(tmp_path, target_is_directory=True)  # a folder link out of it
    (tmp_path / "tokenizer.model").write_text("secret")
    with pytest.raises(ConversionError, match=rf"^{src / 'original' / 'tokenizer.model'}: a symbolic link"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    # a link inside the folder, and a Hugging Face hub snapshot's link into its blobs/, are fine
    (src / "original").unlink()
    (src / "real.json").write_text('{"model": "in"}')
    (src / "tokenizer.json").symlink_to("real.json")
    hub = tmp_path / "hub" / "models--org--m"
    (hub / "blobs").mkdir(parents=True)
    (hub / "blobs" / "abc").write_text('{"model": "blob"}')
    snap = hub / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").symlink_to("../../blobs/abc")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    assert (resolve_iter_dir(tmp_path / "mg") / "tokenizer" / "tokenizer.json").read_text() == '{"model": "in"}'
    assert not (resolve_iter_dir(tmp_path / "mg") / "tokenizer" / "tokenizer.json").is_symlink()
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", tokenizer_dir=snap, **quiet())
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": "blob"}'


# ---------------------------------------------------------------- refused inputs


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"rope_scaling": {**LLAMA31_SCALING, "low_freq_factor": 2.0}}, "low_freq_factor=2.0 is not representable"),
        ({"num_key_value_heads": 3}, "not divisible by num_key_value_heads 3"),
        ({"num_attention_heads": 5}, "hidden_size 64 is not divisible by num_attention_heads 5"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral"}, "not a Llama model"),
        ({"intermediate_size": 100}, "mlp.gate_proj.weight: shape (96, 64) does not match config.json ((100, 64))"),
    ],
)
def test_unrepresentable_configs_are_refused(tmp_path, changes, message):
    src = make_hf_model(tmp_path / "hf")
    _edit_config(src, **changes)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    assert not (tmp_path / "mg").exists()


def test_tied_embedding_mismatches_are_refused(tmp_path):
    src = make_hf_model(tmp_path / "hf")  # untied, has lm_head.weight
    _edit_config(src, tie_word_embeddings=True)
    with pytest.raises(ConversionError, match="lm_head.weight differs from model.embed_tokens.weight"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    tied = make_hf_model(tmp_path / "tied", tie_word_embeddings=True)
    _edit_config(tied, tie_word_embeddings=False)
    with pytest.raises(ConversionError, match="no lm_head.weight"):
        hf_to_megatron(tied, tmp_path / "mg", **quiet())


def _rewrite_tensor(folder: Path, name: str, tensor: torch.Tensor | None) -> Path:
    """Replace (or with None drop) one tensor in whichever shard holds it; returns that file."""
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            if tensor is None:
                del tensors[name]
            else:
                tensors[name] = tensor
            save_file(tensors, f, metadata={"format": "pt"})
            if tensor is None:  # keep the index consistent with the files
                index = folder / "model.safetensors.index.json"
                data = json.loads(index.read_text())
                del data["weight_map"][name]
                index.write_text(json.dumps(data))
            return f
    raise AssertionError(name)


def test_bad_tensor_shape_names_file_and_tensor(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    name = "model.layers.1.self_attn.k_proj.weight"
    f = _rewrite_tensor(src, name, torch.zeros(16, 64, dtype=torch.bfloat16))
    with pytest.raises(ConversionError, match=rf"{f.name}: tensor {name}: shape \(16, 64\) does not match"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())


def test_missing_and_unknown_tensors_are_refused(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    f = _rewrite_tensor(src, "model.layers.0.mlp.up_proj.weight", None)
    with pytest.raises(ConversionError, match="missing from the safetensors files"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    src2 = make_hf_model(tmp_path / "hf2", shard="10GB")
    tensors = load_file(src2 / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    save_file(tensors, src2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="model.safetensors: tensor model.layers.0.self_attn.q_proj.bias is not part"):
        hf_to_megatron(src2, tmp_path / "mg", **quiet())
    assert f.exists()


class _Boom:
    """Unpickling this would create a file: proves nothing was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_weights_are_never_loaded(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    (folder / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    with pytest.raises(ConversionError, match="pickle-based weights are never loaded"):
        hf_to_megatron(folder, tmp_path / "mg", **quiet())
    assert not marker.exists()


def test_malicious_checkpoint_metadata_is_refused(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    marker = tmp_path / "unpickled"
    iter_dir = resolve_iter_dir(tmp_path / "mg")
    (iter_dir / ".metadata").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ConversionError, match="refusing to unpickle posix.makedirs|refusing to unpickle os.makedirs"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert not marker.exists() and not (tmp_path / "out").exists()


def _global_call_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol-4 pickle of `module.name(arg)` (STACK_GLOBAL, which resolves dotted names)."""
    def text(s: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(s.encode())]) + s.encode()

    return (b"\x80\x04" + text(module) + text(name) + pickle.STACK_GLOBAL + text(arg) + pickle.TUPLE1
            + pickle.REDUCE + pickle.STOP)


@pytest.mark.parametrize("module, name", [
    ("torch.distributed.checkpoint.filesystem", "os.makedirs"),  # attribute path through an allowed module
    ("torch.distributed.checkpoint.filesystem", "os"),  # a module re-exported by an allowed module
    ("torch.distributed.checkpoint.state_dict_saver", "save"),  # a function, not a metadata class
])
def test_metadata_allow_list_resolves_only_dcp_classes(tmp_path, module, name):
    marker = tmp_path / "unpickled"
    (tmp_path / ".metadata").write_bytes(_global_call_pickle(module, name, str(marker)))
    with pytest.raises(ConversionError, match=f"refusing to unpickle {module}.{name}"):
        dcp_io.load_metadata(tmp_path)
    assert not marker.exists()


def test_truncated_safetensors_is_refused(tmp_path):
    src = make_hf_model(tmp_path / "hf", shard="10GB")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ConversionError, match="model.safetensors: tensor .* inconsistent offsets"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    header_len = struct.unpack("<Q", f.read_bytes()[:8])[0]
    assert header_len < 100_000


def test_failure_mid_write_leaves_no_output(tmp_path, monkeypatch):
    src = make_hf_model(tmp_path / "hf")
    calls = {"n": 0}
    original = dcp_io.DistCheckpointWriter.add_chunk

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dcp_io.DistCheckpointWriter, "add_chunk", failing)
    with pytest.raises(OSError, match="disk full"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temp folder
    monkeypatch.undo()
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_megatron(src, tmp_path / "mg", **quiet())
    hf_to_megatron(src, tmp_path / "mg", overwrite=True, **quiet())

    from prolong_nemo.convert import safetensors_io

    def failing_copy(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io.ShardWriter, "copy_rows", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mg"]


def test_export_refuses_a_config_that_does_not_match_the_weights(tmp_path):
    from prolong_nemo.model.config import LlamaArch

    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    arch, _ = read_recorded_config(resolve_iter_dir(tmp_path / "mg"))
    wrong = LlamaArch(**{**arch.__dict__, "ffn_hidden_size": 128})
    with pytest.raises(ConversionError, match=r"tensor decoder.layers.mlp.linear_fc1.weight: shape \(2, 192, 64\) != config \(2, 256, 64\)"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", arch=wrong, **quiet())
    with pytest.raises(ConversionError, match="tied-embeddings mismatch"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", arch=arch.replace(tie_word_embeddings=True), **quiet())
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- CLI


def test_cli_round_trip_and_errors(tmp_path, capsys):
    src = make_hf_model(tmp_path / "hf")
    assert cli_main(["convert", "hf-to-megatron", str(src), str(tmp_path / "mg"), "--rope-theta", "1.28e8",
                     "--quiet", "--no-fsync"]) == 0
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "out"), "--quiet",
                     "--max-shard-size", "50KB"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_theta"] == 1.28e8
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))
    _edit_config(src, num_key_value_heads=3)
    assert cli_main(["convert", "hf-to-megatron", str(src), str(tmp_path / "mg2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "not divisible by num_key_value_heads 3" in err and "Traceback" not in err
    assert issubclass(ConversionError, UserError)  # the CLI's own handler prints it (exit code 2)


def test_bridge_run_config_and_release_tracker_are_read(tmp_path):
    """A checkpoint written by Megatron-Bridge training records only its `model:` section."""
    import yaml

    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    root = tmp_path / "mg"
    (root / "iter_0000000").rename(root / "release")
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    bridge = {
        "model": {"_target_": "megatron.bridge.models.llama.Llama31ModelProvider8B", "num_layers": 2,
                  "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
                  "vocab_size": 256, "seq_length": 131072, "layernorm_epsilon": 1e-5, "rotary_base": 1.28e8,
                  "rope_scaling": True, "rope_scaling_factor": 8.0,
                  "share_embeddings_and_output_weights": False},
        "checkpoint": {"save_optim": True, "save_rng": True, "fully_parallel_save": True},
    }
    (root / "release" / "run_config.yaml").write_text(yaml.safe_dump(bridge))
    assert resolve_iter_dir(root) == root / "release"
    arch, _ = read_recorded_config(root / "release")
    assert (arch.rope_theta, arch.max_position_embeddings, arch.rope_scaling) == (1.28e8, 131072, LLAMA31_SCALING)
    # no bos/eos ids recorded: they are given (the API's --ids-from), see test_export_without_a_record_...
    ids = arch_from_hf_config(json.loads((src / "config.json").read_text()))[1]
    megatron_to_hf(root, tmp_path / "out", extras=ids, **quiet())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["rope_theta"], config["max_position_embeddings"]) == (1.28e8, 131072)
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))


@pytest.mark.parametrize("per_layer", [True, False], ids=["chunk-per-layer", "chunks-span-layers"])
def test_export_assembles_tensor_parallel_chunks(tmp_path, per_layer):
    """A checkpoint saved by a TP=2 run stores each layer tensor as two chunks (rows for QKV and
    fc1, columns for linear_proj / fc2): the export reassembles them bit-exactly."""
    import shutil

    from prolong_nemo.convert.megatron_io import common_state

    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    one = resolve_iter_dir(tmp_path / "mg")
    reader = dcp_io.DistCheckpointReader(one)
    split_axis = {"linear_qkv.weight": 1, "linear_fc1.weight": 1, "linear_proj.weight": 2, "linear_fc2.weight": 2}
    out_dir = tmp_path / "tp2" / "iter_0000005"
    writer = dcp_io.DistCheckpointWriter(out_dir)
    for key in reader.tensor_keys():
        shape = reader.global_shape(key)
        full = reader.read_region(key, (0,) * len(shape), shape).clone()
        axis = next((a for suffix, a in split_axis.items() if key.endswith(suffix)), None)
        if axis is None:
            writer.add_chunk(key, full, shape, (0,) * len(shape))
            continue
        half, step = shape[axis] // 2, 1 if per_layer else shape[0]
        for layer in range(0, shape[0], step):
            for rank in range(2):
                chunk = full[layer: layer + step].narrow(axis, rank * half, half).contiguous()
                offset = [layer] + [0] * (len(shape) - 1)
                offset[axis] = rank * half
                writer.add_chunk(key, chunk, shape, tuple(offset))
    writer.finish(common_state(5))
    shutil.copy(one / "run_config.yaml", out_dir / "run_config.yaml")
    tp2 = dcp_io.DistCheckpointReader(out_dir)
    chunks = tp2.metadata.state_dict_metadata["decoder.layers.self_attention.linear_proj.weight"].chunks
    assert len(chunks) == (4 if per_layer else 2)
    assert tp2.locate("decoder.layers.self_attention.linear_qkv.weight", (1, 0, 0), (1, 128, 64)) is None
    assert tp2.locate("decoder.layers.self_attention.linear_qkv.weight", (1, 64, 0), (1, 32, 64)) is not None
    megatron_to_hf(tmp_path / "tp2", tmp_path / "out", **quiet())
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))


def test_export_refuses_model_tensors_it_would_drop(tmp_path):
    """A checkpoint with model tensors a Llama HF model has no place for (here a QKV bias and
    QK-norm weights) is refused, not exported without them; optimizer keys are fine."""
    import shutil

    from prolong_nemo.convert.megatron_io import common_state

    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    one = resolve_iter_dir(tmp_path / "mg")
    reader = dcp_io.DistCheckpointReader(one)

    def rewrite(name: str, extra: dict[str, torch.Tensor]) -> Path:
        out_dir = tmp_path / name / "iter_0000001"
        writer = dcp_io.DistCheckpointWriter(out_dir)
        for key in reader.tensor_keys():
            shape = reader.global_shape(key)
            writer.add_chunk(key, reader.read_region(key, (0,) * len(shape), shape).clone(), shape, (0,) * len(shape))
        for key, tensor in extra.items():
            writer.add_chunk(key, tensor, tuple(tensor.shape), (0,) * tensor.dim())
        writer.finish(common_state(1))
        shutil.copy(one / "run_config.yaml", out_dir / "run_config.yaml")
        return out_dir

    ok = rewrite("optim", {"optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight":
                           torch.zeros(2, 128, 64)})
    megatron_to_hf(ok, tmp_path / "out", **quiet())
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))
    bad = rewrite("bias", {"decoder.layers.self_attention.linear_qkv.bias": torch.ones(2, 128, dtype=torch.bfloat16),
                           "decoder.layers.self_attention.q_layernorm.weight": torch.ones(2, 16, dtype=torch.bfloat16)})
    with pytest.raises(ConversionError, match=r"no place in a Llama-3 HF model: \['decoder.layers.self_attention.linear_qkv.bias', "
                                              r"'decoder.layers.self_attention.q_layernorm.weight'\]"):
        megatron_to_hf(bad, tmp_path / "out2", **quiet())
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("changes, message", [
    ({"normalization": "LayerNorm"}, "model.normalization='LayerNorm' is not representable"),
    ({"add_qkv_bias": True}, "model.add_qkv_bias=True"),
    ({"rotary_percent": 0.5}, "model.rotary_percent=0.5"),
    ({"activation_func": {"_target_": "megatron.core.fusions.fused_bias_gelu.bias_gelu_impl"}}, "activation_func"),
])
def test_bridge_model_sections_that_are_not_llama_are_refused(tmp_path, changes, message):
    import yaml

    model = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
             "vocab_size": 256, "seq_length": 4096, "normalization": "RMSNorm", "gated_linear_unit": True,
             "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False}}
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump({"model": model}))
    assert read_recorded_config(tmp_path)[0].max_position_embeddings == 4096
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump({"model": {**model, **changes}}))
    with pytest.raises(ConversionError, match=re.escape(message)):
        read_recorded_config(tmp_path)


def test_cli_arch_from_for_a_checkpoint_without_recorded_config(tmp_path, capsys):
    """--arch-from gives the architecture (refined by --rope-theta) and the folder's bos/eos ids."""
    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    (resolve_iter_dir(tmp_path / "mg") / "run_config.yaml").unlink()
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "x"), "--quiet"]) == 2
    assert "no recorded model config" in capsys.readouterr().err
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "out"), "--quiet",
                     "--arch-from", str(src), "--rope-theta", "8e6"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (config["rope_theta"], config["bos_token_id"], config["eos_token_id"]) == (8e6, 1, 2)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out"))


def test_cli_ids_from_keeps_the_checkpoints_architecture(tmp_path):
    """--ids-from takes only bos/eos (an Instruct model's <|eot_id|>) from another HF folder."""
    src = make_hf_model(tmp_path / "hf")
    instruct = make_hf_model(tmp_path / "instruct", bos_token_id=7, eos_token_id=[2, 9], rope_theta=5e5)
    hf_to_megatron(src, tmp_path / "mg", rope_theta=1.28e8, **quiet())
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "out"), "--quiet",
                     "--ids-from", str(instruct)]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (config["rope_theta"], config["bos_token_id"], config["eos_token_id"]) == (1.28e8, 7, [2, 9])
    assert generation["eos_token_id"] == [2, 9]


def bridge_only_run_config(iter_dir: Path) -> Path:
    """Replace the record of a converted checkpoint by what Megatron-Bridge training writes: its
    own `model:` / `checkpoint:` sections, no `prolong` record (no bos/eos ids)."""
    import yaml

    path = iter_dir / "run_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({"model": cfg["model"], "checkpoint": cfg["checkpoint"]}))
    return path


def test_export_without_a_record_refuses_to_guess_the_ids(tmp_path, capsys):
    """A checkpoint that records no bos/eos ids (Bridge's run_config.yaml has only `model:`) is not
    exported with Llama-3 base ids: one line names the file and the flags; either flag proceeds."""
    src = make_hf_model(tmp_path / "hf")
    instruct = make_hf_model(tmp_path / "instruct", bos_token_id=7, eos_token_id=[2, 9])
    hf_to_megatron(src, tmp_path / "mg", rope_theta=1.28e8, **quiet())
    run_config = bridge_only_run_config(resolve_iter_dir(tmp_path / "mg"))
    assert read_recorded_config(run_config.parent)[0].rope_theta == 1.28e8  # the arch is still known
    for extra in ([], ["--preset", "llama3-tiny"]):  # a preset gives an architecture, never ids
        assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "x"), "--quiet",
                         *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {run_config}: ")
        assert "--ids-from HF_DIR" in err and "--arch-from HF_DIR" in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()
    with pytest.raises(ConversionError, match=re.escape(str(run_config))):
        megatron_to_hf(tmp_path / "mg", tmp_path / "x", **quiet())
    # --ids-from: the checkpoint's own architecture, the given model's ids
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "ids"), "--quiet",
                     "--ids-from", str(instruct)]) == 0
    config = json.loads((tmp_path / "ids" / "config.json").read_text())
    assert (config["rope_theta"], config["bos_token_id"], config["eos_token_id"]) == (1.28e8, 7, [2, 9])
    assert json.loads((tmp_path / "ids" / "generation_config.json").read_text())["eos_token_id"] == [2, 9]
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "ids"))
    # --arch-from: architecture and ids of the given folder
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "arch"), "--quiet",
                     "--arch-from", str(instruct)]) == 0
    config = json.loads((tmp_path / "arch" / "config.json").read_text())
    assert (config["rope_theta"], config["bos_token_id"], config["eos_token_id"]) == (500000.0, 7, [2, 9])


def test_recorded_ids_are_exported_with_a_given_architecture(tmp_path):
    """--preset / arch= replaces only the architecture: the ids still come from the record."""
    from prolong_nemo.convert.hf_config import HfExtras
    from prolong_nemo.convert.megatron_io import write_prolong_record

    src = make_hf_model(tmp_path / "hf", bos_token_id=128000, eos_token_id=128009)
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    iter_dir = resolve_iter_dir(tmp_path / "mg")
    arch, extras = read_recorded_config(iter_dir)
    assert (extras.bos_token_id, extras.eos_token_id) == (128000, 128009)
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", arch=arch.replace(rope_theta=8e6), **quiet())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["rope_theta"], config["eos_token_id"]) == (8e6, 128009)
    # A Bridge-trained checkpoint: Bridge's run_config.yaml plus our record file, which wins
    bridge_only_run_config(iter_dir)
    write_prolong_record(iter_dir, arch.replace(rope_theta=1.28e8), HfExtras(128000, [128001, 128009]))
    arch2, extras2 = read_recorded_config(iter_dir)
    assert arch2 == arch.replace(rope_theta=1.28e8) and extras2.eos_token_id == [128001, 128009]
    megatron_to_hf(tmp_path / "mg", tmp_path / "out2", **quiet())
    config = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert (config["rope_theta"], config["eos_token_id"]) == (1.28e8, [128001, 128009])
    assert_bit_exact(all_tensors(src), all_tensors(tmp_path / "out2"))
    # a record without ids (a Bridge run started from a checkpoint that had none) still refuses
    write_prolong_record(iter_dir, arch, None)
    assert read_recorded_config(iter_dir)[1] is None
    with pytest.raises(ConversionError, match=r"prolong_record.yaml: .*--ids-from HF_DIR"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out3", **quiet())


def test_reader_refuses_records_that_disagree_with_the_metadata(tmp_path):
    """Assembling a tensor from several chunks never casts a record silently to the metadata dtype."""
    writer = dcp_io.DistCheckpointWriter(tmp_path / "ck")
    full = torch.arange(8, dtype=torch.bfloat16).reshape(4, 2)
    writer.add_chunk("x", full[:2], (4, 2), (0, 0))
    writer.add_chunk("x", full[2:], (4, 2), (2, 0))
    writer.finish({})
    reader = dcp_io.DistCheckpointReader(tmp_path / "ck")
    assert torch.equal(reader.read_region("x", (0, 0), (4, 2)), full)
    metadata = reader.metadata
    metadata.state_dict_metadata["x"].properties.dtype = torch.float32
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConversionError, match=r"holds torch.bfloat16 \(2, 2\), metadata says torch.float32"):
        dcp_io.DistCheckpointReader(tmp_path / "ck").read_region("x", (0, 0), (4, 2))


def test_bridge_trackers_are_written(tmp_path):
    """Bridge reads `latest_train_state.pt` first; with only `latest_checkpointed_iteration.txt`
    it asserts the iteration is > 0 (`read_metadata`), so "0" alone is not loadable as a root."""
    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    root = tmp_path / "mg"
    latest = torch.load(root / "latest_train_state.pt", weights_only=True)  # what Bridge's read_train_state does
    local = torch.load(root / "iter_0000000" / "train_state.pt", weights_only=True)
    assert latest.keys() == local.keys() and latest["step"].item() == 0 and latest["step"].dtype == torch.int64
    state_py = Path(__file__).resolve().parents[1] / ".venv/extras/bridge/megatron/bridge/training/state.py"
    if state_py.is_file():  # every key Bridge's TrainState.load_state_dict reads is there
        source = state_py.read_text()
        body = source[source.index("def load_state_dict"):source.index("class FaultToleranceState")]
        assert set(re.findall(r'state_dict\["(\w+)"\]', body)) == set(latest)


# ---------------------------------------------------------------- issue 10: generation config, --dtype


SAMPLING = {"bos_token_id": 1, "eos_token_id": [2, 9], "do_sample": True, "temperature": 0.7, "top_p": 0.95,
            "transformers_version": "4.57.6"}


def test_export_carries_the_source_generation_config(tmp_path):
    """HF -> Megatron records the source's generation_config.json; the export writes it back as it was
    (also through the record Bridge training writes from the start's ids, and with a given arch)."""
    from prolong_nemo.convert.megatron_io import read_recorded_ids, write_prolong_record

    src = make_hf_model(tmp_path / "hf")
    (src / "generation_config.json").write_text(json.dumps(SAMPLING))
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    iter_dir = resolve_iter_dir(tmp_path / "mg")
    assert read_recorded_config(iter_dir)[1].generation_config == SAMPLING
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == SAMPLING
    # a training checkpoint's record (prolong_record.yaml) made from the start checkpoint's ids
    arch, extras = read_recorded_config(iter_dir)
    bridge_only_run_config(iter_dir)
    write_prolong_record(iter_dir, arch, read_recorded_ids(iter_dir) or extras)
    megatron_to_hf(tmp_path / "mg", tmp_path / "trained", **quiet())
    assert json.loads((tmp_path / "trained" / "generation_config.json").read_text()) == SAMPLING
    megatron_to_hf(tmp_path / "mg", tmp_path / "arch", arch=arch.replace(rope_theta=8e6), **quiet())
    assert json.loads((tmp_path / "arch" / "generation_config.json").read_text()) == SAMPLING


def test_export_without_a_recorded_generation_config_writes_only_the_ids(tmp_path):
    """No generation_config.json at conversion time: the export writes bos/eos only (greedy, as
    transformers derives it from config.json), no invented sampling settings."""
    from transformers import GenerationConfig

    src = make_hf_model(tmp_path / "hf", eos_token_id=[2, 9])
    (src / "generation_config.json").unlink()
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    assert read_recorded_config(resolve_iter_dir(tmp_path / "mg"))[1].generation_config is None
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                      "eos_token_id": [2, 9]}
    loaded = GenerationConfig.from_pretrained(tmp_path / "out")
    assert (loaded.do_sample, loaded.temperature, loaded.top_p, loaded.eos_token_id) == (False, 1.0, 1.0, [2, 9])
    # --ids-from a folder with a generation_config.json carries that one
    instruct = make_hf_model(tmp_path / "instruct", bos_token_id=1, eos_token_id=[2, 9])
    (instruct / "generation_config.json").write_text(json.dumps(SAMPLING))
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "ids"), "--quiet",
                     "--ids-from", str(instruct)]) == 0
    assert json.loads((tmp_path / "ids" / "generation_config.json").read_text()) == SAMPLING


def test_bad_generation_config_is_refused_naming_the_file(tmp_path, capsys):
    src = make_hf_model(tmp_path / "hf")
    (src / "generation_config.json").write_text("[1, 2]")
    assert cli_main(["convert", "hf-to-megatron", str(src), str(tmp_path / "mg"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {src / 'generation_config.json'}: not a JSON object\n"
    (src / "generation_config.json").write_text("{oops")
    assert cli_main(["convert", "hf-to-megatron", str(src), str(tmp_path / "mg"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src / 'generation_config.json'}: not valid JSON (") and err.count("\n") == 1
    assert not (tmp_path / "mg").exists()


def test_export_dtype_casts_while_streaming(tmp_path, monkeypatch):
    """A float32 checkpoint exported with --dtype bfloat16: every tensor is the bf16 cast of the
    source, config.json says bfloat16; the cast reads one Megatron tensor slice at a time."""
    src = make_hf_model(tmp_path / "hf", dtype=torch.float32)
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    source = all_tensors(src)
    largest = max(t.nbytes for t in source.values()) * 3  # a fused QKV / gate+up slice at most
    reads = []
    original = dcp_io.DistCheckpointReader.read_region
    monkeypatch.setattr(dcp_io.DistCheckpointReader, "read_region",
                        lambda self, *a: reads.append(original(self, *a)) or reads[-1])
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "bf16"), "--quiet",
                     "--dtype", "bfloat16"]) == 0
    assert reads and max(r.nbytes for r in reads) <= largest and all(r.dtype == torch.float32 for r in reads)
    assert_bit_exact({n: t.to(torch.bfloat16) for n, t in source.items()}, all_tensors(tmp_path / "bf16"))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config  # transformers >= 4.56 reads "dtype"
    megatron_to_hf(tmp_path / "mg", tmp_path / "fp16", dtype="float16", **quiet())
    assert_bit_exact({n: t.to(torch.float16) for n, t in source.items()}, all_tensors(tmp_path / "fp16"))
    # auto (the default): the stored dtype, copied file-to-file as before
    reads.clear()
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "auto"), "--quiet"]) == 0
    assert not reads
    assert_bit_exact(source, all_tensors(tmp_path / "auto"))
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "float32"
    # a bf16 checkpoint widened to float32 is exact
    src16 = make_hf_model(tmp_path / "hf16")
    hf_to_megatron(src16, tmp_path / "mg16", **quiet())
    megatron_to_hf(tmp_path / "mg16", tmp_path / "fp32", dtype=torch.float32, **quiet())
    assert_bit_exact({n: t.float() for n, t in all_tensors(src16).items()}, all_tensors(tmp_path / "fp32"))


def test_export_dtype_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "x"), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"^dtype 'fp8': not one of auto, bfloat16, float16, float32$"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "x", dtype="fp8", **quiet())
