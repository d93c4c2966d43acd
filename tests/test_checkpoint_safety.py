"""Opening checkpoints (issue 13): every path that hands a checkpoint to megatron-core /
Megatron-Bridge checks its pickles first; the iteration marker is written atomically and a
damaged one is survived; a root holding only `latest_train_state.pt` is refused."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from prolong_nemo.convert import ConversionError, hf_to_megatron
from prolong_nemo.convert.megatron_io import check_checkpoint, write_atomic, write_tracker
from prolong_nemo.recipes.config import RecipeError
from prolong_nemo.training.cpu import runner as cpu_runner
from prolong_nemo.training.cpu.runner import TrainConfig, build_state, latest_step, load_checkpoint, train
from prolong_nemo.training.start import StartPoint, resolve_start
from prolong_nemo.training.synthetic import ArithmeticDocuments

CFG = dict(train_iters=2, micro_batches=1, seq_length=64, warmup_iters=0, seed=3)


class _Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _collate():
    from prolong_nemo.data.dataset import collate

    return collate


@pytest.fixture(scope="module")
def cpu_ckpt(tmp_path_factory) -> Path:
    """A real CPU-runner checkpoint root (megatron-core dist_checkpointing): iter 1 and 2."""
    root = tmp_path_factory.mktemp("cpu") / "ckpt"
    data = ArithmeticDocuments(vocab_size=512, row_tokens=64, seed=0)
    train(TrainConfig(**CFG, save_dir=str(root), save_interval=1), data, _collate(), log=lambda _l: None)
    return root


@pytest.fixture
def ckpt(cpu_ckpt, tmp_path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(cpu_ckpt, root)
    return root


def _state():
    return build_state(TrainConfig(**CFG))


# ---------------------------------------------------------------- legitimate checkpoints pass


def test_cpu_runner_checkpoint_passes_the_check_and_resumes(ckpt):
    assert check_checkpoint(ckpt) == ckpt / "iter_0000002"
    assert check_checkpoint(ckpt / "iter_0000001") == ckpt / "iter_0000001"
    state = _state()
    assert load_checkpoint(ckpt, state) and state.step == 2 and state.consumed_samples == 2


def test_converter_checkpoint_passes_the_check(tmp_path):
    from test_convert import make_hf_model

    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg", show_progress=False)
    # .metadata, common.pt, train_state.pt and the root's latest_train_state.pt (Bridge's layout)
    assert check_checkpoint(tmp_path / "mg") == tmp_path / "mg" / "iter_0000000"


# ---------------------------------------------------------------- crafted pickles are refused


def _craft_metadata(iter_dir: Path, marker: Path) -> Path:
    path = iter_dir / ".metadata"
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    return path


def test_crafted_metadata_is_refused_on_resume(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    bad = _craft_metadata(ckpt / "iter_0000002", marker)
    with pytest.raises(ConversionError, match=rf"^{bad}: refusing to unpickle posix\.system"):
        load_checkpoint(ckpt, _state())
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["resume", "chain", "weights"])
def test_crafted_metadata_is_refused_by_every_cpu_start(ckpt, tmp_path, kind):
    from prolong_nemo.training.cpu.main import apply_start

    marker = tmp_path / "pwned"
    bad = _craft_metadata(ckpt / "iter_0000002", marker)
    start = StartPoint(kind, load=str(ckpt), pretrained=str(ckpt) if kind == "weights" else None)
    if kind == "weights":
        start = StartPoint("weights", load=str(tmp_path / "own"), pretrained=str(ckpt))
    with pytest.raises(RecipeError, match=rf"^{bad}: refusing"):
        apply_start(start, _state(), None, log=lambda _l: None)
    assert not marker.exists()


def test_crafted_common_pt_is_refused(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    bad = ckpt / "iter_0000002" / "common.pt"
    torch.save({"iteration": _Exploit(marker)}, bad)
    with pytest.raises(ConversionError, match=rf"^{bad}: refusing to load"):
        load_checkpoint(ckpt, _state())
    assert not marker.exists()


def test_crafted_sharded_object_in_a_distcp_file_is_refused(tmp_path):
    """DCP's load planner unpickles ShardedObject bytes with weights_only=False."""
    from prolong_nemo.convert.dcp_io import DistCheckpointWriter

    marker = tmp_path / "pwned"
    writer = DistCheckpointWriter(tmp_path / "iter_0000000", fsync=False)
    writer.add_chunk("w", torch.ones(2, 2), (2, 2), (0, 0))
    writer.add_object("rng_state/shard_0.0_1.1", {"np": _Exploit(marker)})
    writer.finish({"iteration": 0})
    with pytest.raises(ConversionError, match=rf"^{tmp_path / 'iter_0000000'}/__0_0\.distcp: object rng_state/"):
        check_checkpoint(tmp_path / "iter_0000000")
    assert not marker.exists()


def _fake_bridge(monkeypatch) -> list:
    """`megatron.bridge.training.pretrain` recording its calls (Bridge is not installed here)."""
    calls: list = []
    for name in ("megatron.bridge", "megatron.bridge.training", "megatron.bridge.data"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    base = types.ModuleType("megatron.bridge.data.base")
    base.DatasetBuildContext = type("DatasetBuildContext", (), {})
    base.DatasetProvider = type("DatasetProvider", (), {})
    mod = types.ModuleType("megatron.bridge.training.pretrain")
    mod.pretrain = lambda *a, **k: calls.append(a)
    for fake in (base, mod):
        monkeypatch.setitem(sys.modules, fake.__name__, fake)
    # our Bridge modules are imported on the fakes: none before, and none left after the test
    for name in ("prolong_nemo.training.bridge.config", "prolong_nemo.training.bridge.main"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    return calls


@pytest.mark.parametrize("where", ["load", "pretrained"])
def test_bridge_main_refuses_a_crafted_checkpoint_before_bridge_opens_it(tmp_path, monkeypatch, where):
    calls = _fake_bridge(monkeypatch)
    from prolong_nemo.training.bridge.main import main

    hf_to_megatron(_tiny_hf(tmp_path), tmp_path / "mg", show_progress=False)
    marker = tmp_path / "pwned"
    bad = tmp_path / "mg" / "latest_train_state.pt"  # Bridge's read_train_state opens this one first
    torch.save({"step": _Exploit(marker)}, bad)
    if where == "load":
        args = [f"checkpoint.dir={tmp_path / 'mg'}"]
    else:
        args = [f"checkpoint.dir={tmp_path / 'sft'}", f"checkpoint.init_from={tmp_path / 'mg'}"]
    with pytest.raises(SystemExit, match=rf"^error: {bad}: refusing to load"):
        main(["sft", *args])
    assert not marker.exists() and calls == []


def _tiny_hf(tmp_path: Path) -> Path:
    from test_convert import make_hf_model

    return make_hf_model(tmp_path / "hf")


# ---------------------------------------------------------------- the iteration marker


def test_damaged_marker_falls_back_to_the_newest_complete_checkpoint(ckpt):
    (ckpt / "latest_checkpointed_iteration.txt").write_text("")
    lines: list[str] = []
    state = _state()
    assert load_checkpoint(ckpt, state, log=lines.append) and state.step == 2
    assert len(lines) == 1 and "falling back to the newest complete checkpoint" in lines[0]
    assert str(ckpt / "iter_0000002") in lines[0] and "latest_checkpointed_iteration.txt" in lines[0]
    # an incomplete newest folder (no metadata.json: the save did not finish) is skipped
    (ckpt / "iter_0000002" / "metadata.json").unlink()
    (ckpt / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\x00garbage")
    assert latest_step(ckpt) == 1


def test_damaged_marker_without_a_complete_checkpoint_is_a_one_line_error(ckpt):
    marker = ckpt / "latest_checkpointed_iteration.txt"
    marker.write_text("\n")
    for folder in ckpt.glob("iter_*"):
        (folder / "metadata.json").unlink()
    with pytest.raises(ConversionError, match=rf"^{marker}: unexpected content ''; no complete iter_\*") as e:
        load_checkpoint(ckpt, _state())
    assert "\n" not in str(e.value)


def test_marker_is_replaced_atomically(ckpt, monkeypatch):
    state = _state()
    assert load_checkpoint(ckpt, state)
    state.step = 3

    def fail(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        cpu_runner.save_checkpoint(ckpt, state)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "latest_checkpointed_iteration.txt"
    path.write_text("7")
    monkeypatch.setattr(os, "fsync", lambda _fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError, match="io error"):
        write_atomic(path, b"8")
    assert path.read_text() == "7" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_converter_tracker_is_written_last_and_atomically(tmp_path, monkeypatch):
    (tmp_path / "iter_0000000").mkdir()
    written: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (written.append(Path(b).name), real(a, b)))
    write_tracker(tmp_path, 0)
    assert written == ["train_state.pt", "latest_train_state.pt", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "0"


def test_root_with_only_latest_train_state_is_refused(tmp_path):
    from prolong_nemo.recipes.stages import load_recipe

    root = tmp_path / "ck"
    root.mkdir()
    torch.save({"step": torch.tensor(4)}, root / "latest_train_state.pt")
    recipe = load_recipe("stage_64k_cpu", [f"checkpoint.dir={root}"])
    with pytest.raises(RecipeError, match=rf"^{root}: holds latest_train_state.pt but neither") as e:
        resolve_start(recipe)
    assert "\n" not in str(e.value)
    (root / "iter_0000004").mkdir()  # with its iteration folder it is a resume again
    assert resolve_start(recipe) == StartPoint("resume", load=str(root))
