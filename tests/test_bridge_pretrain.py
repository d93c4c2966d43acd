"""The production training loop, run for real: Megatron-Bridge's own `pretrain()` trains our
recipes on CPU over gloo under torchrun, 2 ranks, with the recipes' production settings
(distributed optimizer, overlap_grad_reduce and overlap_param_gather, per-token loss, chunked
LM head + cross-entropy), through Bridge's data loader with our dataset provider, our forward
step and our callbacks; megatron-core's DistributedDataParallel, DistributedOptimizer,
schedules and dist checkpointing. The shims that make it run on a CPU, each with its reason:
tests/bridge_runtime.py.

Four torchrun launches share the module (about 3 minutes on 2 cores):
- `reference`: stage_64k_cpu for 16 steps uninterrupted (DP=2), then the 64K -> 512K chain
  (weights + Adam state, fresh schedule), SFT from the 512K weights, and stage_64k_cpu again
  with CP=2;
- `preempted`: the same 64K stage with 2 data-loader workers per rank, SIGTERM to torchrun
  mid-run, as Slurm / torchrun stop a job;
- `resumed`: the same command again, which resumes from the checkpoint the SIGTERM left;
- `bridge05`: Megatron-Bridge 0.5.0 (NGC NeMo 26.06) on megatron-core 0.18.2, one launch of
  three runs: stage_64k_cpu for 6 steps uninterrupted, the same with SIGTERM to each rank after
  step 3 (0.5.0 saves on it only through our SignalTrapCallback), and the same again, resuming.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 16  # steps are ~0.1 s: the SIGTERM after step 3 must land well before the end
BRIDGE = "0.6.2"

pytestmark = pytest.mark.skipif(
    not (REPO / ".venv" / "extras" / "bridge-runtime").is_dir(),
    reason="Megatron-Bridge runtime side folder missing (scripts/setup.sh installs it)")


def _write_domain(folder: Path, n: int, length: int, seed: int, *, mask: bool = False, vocab: int = 512) -> None:
    from prolong_nemo.data.mds import write_domain

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(1, length), size=int(rng.integers(1, 6)), replace=False))
        bounds = np.concatenate([[0], cuts, [length]])
        sample = {"input_ids": rng.integers(0, vocab, length).astype(np.uint32),
                  "indices": np.stack([bounds[:-1], bounds[1:]], 1).astype(np.uint32),
                  "length": length, "domain": folder.name}
        if mask:
            sample["mask"] = (rng.random(length) < 0.5).astype(np.uint8)
        samples.append(sample)
    write_domain(str(folder), samples, with_mask=mask)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge_pretrain")
    data = root / "data"
    for i, (stage, length) in enumerate((("64k", 512), ("512k", 4096))):
        _write_domain(data / stage / "long", 24, length, seed=2 * i)
        _write_domain(data / stage / "short", 24, length, seed=2 * i + 1)
    _write_domain(data / "sft" / "chat", 24, 512, seed=9, mask=True)
    return root


def _env(root: Path, runs: str) -> dict[str, str]:
    """The job environment `prolong-nemo train` / `launch` give their ranks (launch.job_environment)."""
    from prolong_nemo.recipes.launch import job_environment
    from prolong_nemo.recipes.stages import load_recipe

    base = {**os.environ, "PROLONG_DATA_CPU": str(root / "data"), "PROLONG_RUNS": str(root / runs)}
    return job_environment(load_recipe("stage_64k_cpu"), base)


def _launch(root: Path, name: str, runs: list[dict], runs_dir: str, bridge: str = BRIDGE):
    """Start `torchrun --nproc-per-node 2 tests/bridge_runtime.py SPEC` in its own session."""
    spec = root / f"{name}.json"
    spec.write_text(json.dumps({"bridge": bridge, "runs": runs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           str(REPO / "tests" / "bridge_runtime.py"), str(spec)]
    log = open(root / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=root, env=_env(root, runs_dir), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(proc, root: Path, name: str, timeout: float = 420) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{name} did not finish in {timeout} s; log: {_tail(root, name)}")


def _tail(root: Path, name: str, lines: int = 60) -> str:
    text = (root / f"{name}.log").read_text(errors="replace").splitlines()
    return "\n".join(line for line in text[-lines:])


def _losses(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _run(recipe: str, metrics: Path, *overrides: str) -> dict:
    return {"recipe": recipe, "overrides": ["cluster.gpus_per_node=2", *overrides], "metrics": str(metrics)}


FIRST_STAGE = (f"train.steps={STEPS}", "checkpoint.save_interval=100")
CP2_GC_INTERVAL = 7  # Bridge fields the recipe schema does not model, passed as bridge.train.*  # no save before the end: overlap runs on


@pytest.fixture(scope="module")
def reference(workspace):
    m = workspace / "metrics"
    m.mkdir()
    runs = [_run("stage_64k_cpu", m / "64k.jsonl", *FIRST_STAGE),
            _run("stage_512k_cpu", m / "512k.jsonl"),
            _run("sft_cpu", m / "sft.jsonl"),
            _run("stage_64k_cpu", m / "64k_cp2.jsonl", *FIRST_STAGE, "parallel.cp=2",
                 f"checkpoint.dir={workspace / 'cp2'}", "bridge.train.manual_gc=true",
                 f"bridge.train.manual_gc_interval={CP2_GC_INTERVAL}")]
    proc = _launch(workspace, "reference", runs, "runs")
    code = _wait(proc, workspace, "reference")
    assert code == 0, _tail(workspace, "reference")
    return {name: _losses(m / f"{name}.jsonl") for name in ("64k", "512k", "sft", "64k_cp2")}


def test_production_settings_train_past_iteration_3(reference):
    """overlap_param_gather + the chunked head: iteration 3 used to trip megatron's
    `assert self.param_gather_handle is None` (the head read the weight without DDP's hook)."""
    losses = reference["64k"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) and 5.0 < v < 7.0 for v in losses.values())  # ln(512) = 6.24


def test_context_parallel_run_matches_data_parallel(reference):
    """CP=2 splits every document over both ranks (TE's layout); DP=2 splits the batch.
    Same samples, same model: the same losses up to bf16 summation order."""
    dp, cp = reference["64k"], reference["64k_cp2"]
    assert sorted(cp) == sorted(dp)
    assert max(abs(cp[s] - dp[s]) for s in dp) <= 2e-3


def test_bridge_pass_through_reaches_the_config_container(reference, workspace):
    """`bridge.train.manual_gc=true bridge.train.manual_gc_interval=7` are on the ConfigContainer
    the real loop trained with (the run_config.yaml Bridge saved with the checkpoint), and only
    in the run that asked for them."""
    import yaml

    def saved_train(root: Path) -> dict:
        step = int((root / "latest_checkpointed_iteration.txt").read_text())
        return yaml.safe_load((root / f"iter_{step:07d}" / "run_config.yaml").read_text())["train"]

    asked = saved_train(workspace / "cp2")
    assert asked["manual_gc"] is True and asked["manual_gc_interval"] == CP2_GC_INTERVAL
    default = saved_train(workspace / "runs" / "stage_64k_cpu" / "checkpoints")
    assert default["manual_gc"] is False and default["manual_gc_interval"] != CP2_GC_INTERVAL


def test_chain_restarts_schedule_and_keeps_adam_state(reference, workspace):
    from prolong_nemo.recipes.stages import load_recipe

    log = (workspace / "reference.log").read_text()
    assert f"loaded {workspace / 'runs' / 'stage_64k_cpu' / 'checkpoints'} at its step {STEPS}: weights and Adam state kept" in log
    r512 = load_recipe("stage_512k_cpu")
    assert sorted(reference["512k"]) == list(range(1, r512.train.steps + 1))  # the step count restarted
    lines = [json.loads(line) for line in (workspace / "metrics" / "512k.jsonl").read_text().splitlines()]
    # warmup from 0 over this stage's warmup steps, then cosine to its own min LR
    assert lines[-1]["lr"] == pytest.approx(r512.optim.min_lr, rel=1e-6)
    assert max(r["lr"] for r in lines) <= r512.optim.lr * (1 + 1e-6)
    saved = workspace / "runs" / "stage_512k_cpu" / "checkpoints"
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == str(r512.train.steps)
    assert sorted(reference["sft"]) == list(range(1, load_recipe("sft_cpu").train.steps + 1))


def _checkpoint_complete(root: Path, world: int = 2) -> int:
    step = int((root / "latest_checkpointed_iteration.txt").read_text().strip())
    folder = root / f"iter_{step:07d}"
    for name in (".metadata", "metadata.json", "run_config.yaml", "train_state.pt", "prolong_record.yaml",
                 *(f"__{r}_0.distcp" for r in range(world))):
        assert (folder / name).is_file(), f"{folder / name} missing"
    return step


@pytest.fixture(scope="module")
def preempted(workspace, reference):
    m = workspace / "metrics"
    stage = (*FIRST_STAGE, "data.num_workers=2")
    proc = _launch(workspace, "preempted", [_run("stage_64k_cpu", m / "preempted.jsonl", *stage)], "preempt")
    deadline = time.monotonic() + 300
    while len(_losses(m / "preempted.jsonl")) < 3:  # mid-run: a few steps done
        assert proc.poll() is None, _tail(workspace, "preempted")
        assert time.monotonic() < deadline, _tail(workspace, "preempted")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what Slurm / a user stopping torchrun does
    _wait(proc, workspace, "preempted")
    ckpt = workspace / "preempt" / "stage_64k_cpu" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").exists(), _tail(workspace, "preempted")
    step = _checkpoint_complete(ckpt)
    proc = _launch(workspace, "resumed", [_run("stage_64k_cpu", m / "resumed.jsonl", *stage)], "preempt")
    assert _wait(proc, workspace, "resumed") == 0, _tail(workspace, "resumed")
    return step, _losses(m / "preempted.jsonl"), _losses(m / "resumed.jsonl")


def test_sigterm_saves_a_complete_checkpoint_and_the_resumed_run_matches(preempted, reference):
    step, before, after = preempted
    assert 3 <= step < STEPS
    assert sorted(before)[-1] == step  # the save is of the last step trained
    assert sorted(after) == list(range(step + 1, STEPS + 1))
    uninterrupted = reference["64k"]
    for s, loss in {**before, **after}.items():
        assert abs(loss - uninterrupted[s]) <= 1e-6, (s, loss, uninterrupted[s])


# Bridge 0.5.0 runs on megatron-core 0.18.2 (bridge_runtime.RELEASES): both beside the venv.
BRIDGE_05_FOLDERS = ("bridge05", "mcore018")
BRIDGE_05_STEPS, BRIDGE_05_SIGTERM = 6, 3


@pytest.fixture(scope="module")
def bridge05(workspace):
    missing = [f for f in BRIDGE_05_FOLDERS if not (REPO / ".venv" / "extras" / f).is_dir()]
    if missing:
        pytest.skip(f"Megatron-Bridge 0.5.0 side folders missing: {', '.join(missing)} under .venv/extras")
    m = workspace / "metrics"
    m.mkdir(exist_ok=True)
    stage = (f"train.steps={BRIDGE_05_STEPS}", "checkpoint.save_interval=100")
    runs = [_run("stage_64k_cpu", m / "b05_ref.jsonl", *stage, f"checkpoint.dir={workspace / 'b05_ref'}"),
            {**_run("stage_64k_cpu", m / "b05_preempted.jsonl", *stage), "sigterm_at": BRIDGE_05_SIGTERM},
            _run("stage_64k_cpu", m / "b05_resumed.jsonl", *stage)]
    proc = _launch(workspace, "bridge05", runs, "b05", bridge="0.5.0")
    assert _wait(proc, workspace, "bridge05") == 0, _tail(workspace, "bridge05")
    return {name: _losses(m / f"b05_{name}.jsonl") for name in ("ref", "preempted", "resumed")}


def test_bridge_05_production_settings_train_past_iteration_3(bridge05):
    losses = bridge05["ref"]
    assert sorted(losses) == list(range(1, BRIDGE_05_STEPS + 1))
    assert all(np.isfinite(v) and 5.0 < v < 7.0 for v in losses.values())


def test_bridge_05_sigterm_saves_and_the_resumed_run_matches(bridge05, workspace):
    """Bridge 0.5 builds its SIGTERM trap without installing it: without our SignalTrapCallback
    the signal kills the ranks and the launch fails."""
    assert sorted(bridge05["preempted"]) == list(range(1, BRIDGE_05_SIGTERM + 1))
    ckpt = workspace / "b05" / "stage_64k_cpu" / "checkpoints"
    assert (ckpt / f"iter_{BRIDGE_05_SIGTERM:07d}").is_dir(), _tail(workspace, "bridge05")
    log = (workspace / "bridge05.log").read_text().splitlines()
    assert any(f"successfully loaded checkpoint from {ckpt} " in line and line.endswith(f"at iteration {BRIDGE_05_SIGTERM}")
               for line in log), _tail(workspace, "bridge05")
    assert sorted(bridge05["resumed"]) == list(range(BRIDGE_05_SIGTERM + 1, BRIDGE_05_STEPS + 1))
    assert _checkpoint_complete(ckpt) == BRIDGE_05_STEPS  # the resumed run's final save
    uninterrupted = bridge05["ref"]
    for s, loss in {**bridge05["preempted"], **bridge05["resumed"]}.items():
        assert abs(loss - uninterrupted[s]) <= 1e-6, (s, loss, uninterrupted[s])


def test_bridge_checkpoints_pass_the_safety_check(reference, preempted, workspace):
    """Every checkpoint the real loop wrote (Bridge's train_state.pt, latest_train_state.pt, the
    distributed optimizer's ShardedObjects) passes the check every start runs before megatron or
    Bridge unpickles anything (megatron_io.check_checkpoint)."""
    from prolong_nemo.convert.megatron_io import check_checkpoint

    roots = sorted(p.parent for p in workspace.rglob("latest_checkpointed_iteration.txt"))
    assert len(roots) >= 5  # 64k, 512k, sft, CP=2, preempted / resumed (+ Bridge 0.5.0's)
    for root in roots:
        for folder in sorted(root.glob("iter_*")):
            assert check_checkpoint(folder) == folder
        assert check_checkpoint(root, strict=True).parent == root
