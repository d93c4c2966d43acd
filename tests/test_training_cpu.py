"""CPU runner: loss falls on learnable packed data; crash + resume reproduces the losses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prolong_nemo.training.cpu.runner import TrainConfig, latest_step, train
from prolong_nemo.training.synthetic import ArithmeticDocuments

REPO = Path(__file__).resolve().parents[1]


def _collate():
    from prolong_nemo.data.dataset import collate

    return collate


def test_cpu_patches_are_idempotent_and_cover_rope():
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from prolong_nemo.cpu_compat import apply_cpu_patches

    assert apply_cpu_patches(force=True) and apply_cpu_patches(force=True)
    first = RotaryEmbedding.get_emb
    apply_cpu_patches(force=True)
    assert RotaryEmbedding.get_emb is first
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    emb = rope.get_emb(5)
    assert emb.shape == (5, 1, 1, 8) and emb.device.type == "cpu"
    assert torch.allclose(emb[3, 0, 0, :4], 3 * rope.inv_freq)


def test_loss_falls_clearly_on_learnable_packed_data():
    data = ArithmeticDocuments(vocab_size=512, row_tokens=256, seed=0)
    cfg = TrainConfig(train_iters=40, micro_batches=2, lr=1e-2, min_lr=1e-4, chunk_tokens=100, seed=5)
    lines: list[str] = []
    state = train(cfg, data, _collate(), log=lines.append)
    losses = [r.loss for r in state.history]
    assert len(losses) == 40
    assert abs(losses[0] - math.log(512)) < 0.3  # starts near uniform
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    last = lines[-1]
    for field in ("step 40/40", "(100.0%)", "loss ", "tokens/s ", "ETA "):
        assert field in last, last


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASTER_PORT=str(_port()), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "prolong_nemo.cli", "train", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _port() -> int:
    from model_fixtures import _free_port

    return _free_port()


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.timeout(600)
def test_crash_and_resume_reproduces_uninterrupted_losses(tmp_path):
    common = ["--train-iters", "6", "--micro-batches", "2", "--lr", "1e-2", "--chunk-tokens", "100"]
    ckpt = tmp_path / "ckpt"
    # run 1: checkpoint at step 3, then "crash" after step 4 (step 4 is lost)
    _cli([*common, "--save", str(ckpt), "--save-interval", "3", "--exit-after", "4",
          "--metrics-file", str(tmp_path / "a.jsonl")], tmp_path)
    assert latest_step(ckpt) == 3
    assert (ckpt / "iter_0000003" / ".metadata").exists()
    # run 2: same command line without the crash: resumes from 3, redoes 4..6
    out = _cli([*common, "--save", str(ckpt), "--save-interval", "3",
                "--metrics-file", str(tmp_path / "b.jsonl")], tmp_path).stdout
    assert "resumed from" in out and "at step 3" in out
    assert latest_step(ckpt) == 6
    # reference: one uninterrupted run in this process
    data = ArithmeticDocuments(vocab_size=512, row_tokens=256, seed=TrainConfig().seed)
    ref = train(TrainConfig(train_iters=6, micro_batches=2, lr=1e-2, chunk_tokens=100), data, _collate(), log=lambda _: None)
    reference = {r.step: r.loss for r in ref.history}
    first, resumed = _losses(tmp_path / "a.jsonl"), _losses(tmp_path / "b.jsonl")
    assert sorted(first) == [1, 2, 3, 4] and sorted(resumed) == [4, 5, 6]
    for step, loss in {**first, **resumed}.items():
        assert abs(loss - reference[step]) <= 1e-6, (step, loss, reference[step])
    assert reference[6] != reference[4]  # the losses move: equality is not trivial


@pytest.mark.timeout(600)
def test_cli_context_parallel_2_matches_cp1_losses(tmp_path):
    """`prolong-nemo train --cp 2` under torchrun (two gloo ranks, per-document partition,
    CP attention, finalize over CP) trains the same model as one process: same losses."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    metrics = tmp_path / "cp2.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), "-m", "prolong_nemo.cli", "train", "--cp", "2", "--train-iters", "4",
           "--micro-batches", "2", "--lr", "1e-2", "--chunk-tokens", "64", "--metrics-file", str(metrics)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cp2 = _losses(metrics)
    # reference: CP = 1 in this process on the same (CP-2-padded) rows
    data = ArithmeticDocuments(vocab_size=512, row_tokens=256, seed=TrainConfig().seed, cp_size=2)
    ref = train(TrainConfig(train_iters=4, micro_batches=2, lr=1e-2, chunk_tokens=64), data, _collate(),
                log=lambda _: None)
    assert sorted(cp2) == [1, 2, 3, 4]
    for record in ref.history:
        assert abs(cp2[record.step] - record.loss) <= 1e-5, (record.step, cp2[record.step], record.loss)
    assert abs(ref.history[-1].loss - ref.history[0].loss) > 1e-2  # training moved the model
