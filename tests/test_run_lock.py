"""One training run per checkpoint dir: `<checkpoint.dir>/.prolong-run.lock` (issue 13, item 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prolong_nemo.errors import UserError
from prolong_nemo.training.run_lock import LOCK_NAME, RunLockError, job_identity, run_lock

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from prolong_nemo.training.run_lock import run_lock
lock = run_lock(sys.argv[1], rank=0, environ={"SLURM_JOB_ID": sys.argv[2]}, log=print)
lock.__enter__()
print("held", flush=True)
time.sleep(120)
"""


def _hold(save_dir: Path, job: str = "4242") -> subprocess.Popen:
    """Another process holding the lock as rank 0 of Slurm job `job`, until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(save_dir), job], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_job_identity_names_the_job_from_its_environment():
    assert job_identity({"SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "n1",
                         "MASTER_PORT": "29500"}) == "slurm job 77, torchelastic run abc, master n1:29500"
    # torchrun without --rdzv-id reports "none": not an identity
    assert job_identity({"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "n1", "MASTER_PORT": "1"}) == "master n1:1"
    assert job_identity({}) is None


def test_second_acquirer_in_another_process_is_refused_naming_the_holder(tmp_path):
    holder = _hold(tmp_path / "ckpt")
    try:
        with pytest.raises(RunLockError) as e:
            with run_lock(tmp_path / "ckpt", rank=0, environ={"SLURM_JOB_ID": "9"}):
                pass
        message = str(e.value)
        assert "\n" not in message and isinstance(e.value, UserError)
        assert str(tmp_path / "ckpt") in message
        assert f"pid {holder.pid}" in message and "slurm job 4242" in message and os.uname().nodename in message
    finally:
        _kill(holder)


def test_lock_of_a_killed_holder_is_acquirable_again(tmp_path):
    holder = _hold(tmp_path / "ckpt")
    _kill(holder)  # SIGKILL: no cleanup ran; the kernel released the flock
    with run_lock(tmp_path / "ckpt", rank=0, environ={"SLURM_JOB_ID": "5"}):
        record = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["job"] == "slurm job 5"


def test_same_process_cannot_take_the_lock_twice(tmp_path):
    with run_lock(tmp_path, rank=0, environ={}):
        with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path, rank=0, environ={}):
                pass
    with run_lock(tmp_path, rank=0, environ={}):  # released on exit
        pass


def test_nonzero_rank_of_the_holding_job_proceeds(tmp_path):
    holder = _hold(tmp_path / "ckpt", job="4242")
    try:
        started = time.monotonic()
        with run_lock(tmp_path / "ckpt", rank=3, environ={"SLURM_JOB_ID": "4242"}, wait_s=5):
            pass
        assert time.monotonic() - started < 2
    finally:
        _kill(holder)


def test_nonzero_rank_of_another_job_is_refused(tmp_path):
    holder = _hold(tmp_path / "ckpt", job="4242")
    try:
        with pytest.raises(RunLockError) as e:
            with run_lock(tmp_path / "ckpt", rank=1, environ={"SLURM_JOB_ID": "17"}, wait_s=5, grace_s=0.5):
                pass
        assert "slurm job 4242" in str(e.value) and "slurm job 17" in str(e.value)
        assert str(tmp_path / "ckpt") in str(e.value)
    finally:
        _kill(holder)


def test_nonzero_rank_waits_for_its_rank_zero(tmp_path):
    ckpt = tmp_path / "ckpt"
    # a record left by a SIGKILLed run of another job: stale, the rank waits for its own rank 0
    ckpt.mkdir()
    (ckpt / LOCK_NAME).write_text(json.dumps({"host": "old", "pid": 1, "job": "slurm job 1"}))
    late = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)\n" + HOLDER, str(ckpt), "88"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        with run_lock(ckpt, rank=2, environ={"SLURM_JOB_ID": "88"}, wait_s=20, grace_s=15):
            assert json.loads((ckpt / LOCK_NAME).read_text())["job"] == "slurm job 88"
    finally:
        _kill(late)
    with pytest.raises(RunLockError, match="rank 0 .* did not take"):  # nobody ever takes it
        with run_lock(tmp_path / "other", rank=1, environ={"SLURM_JOB_ID": "88"}, wait_s=0.5):
            pass


def test_unsupported_flock_warns_and_runs_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lines: list[str] = []
    with run_lock(tmp_path, rank=0, environ={}, log=lines.append):
        pass
    assert len(lines) == 1 and "unlocked" in lines[0] and str(tmp_path) in lines[0]


PROBE = """
import sys
from prolong_nemo.training.run_lock import RunLockError, run_lock
try:
    with run_lock(sys.argv[1], rank=0, environ={}):
        print("acquired")
except RunLockError as e:
    print("refused:", e)
"""


def _probe(save_dir: Path) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, str(save_dir)], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60).stdout.strip()


@pytest.mark.timeout(300)
def test_second_cpu_training_on_one_save_dir_is_refused(tmp_path):
    """The CPU runner holds the lock for the whole run; a second run on the dir is refused."""
    from prolong_nemo.data.dataset import collate
    from prolong_nemo.training.cpu.runner import TrainConfig, train
    from prolong_nemo.training.synthetic import ArithmeticDocuments

    ckpt = tmp_path / "ckpt"
    data = ArithmeticDocuments(vocab_size=512, row_tokens=64, seed=0)
    cfg = TrainConfig(seq_length=64, train_iters=2, warmup_iters=0, micro_batches=1, save_dir=str(ckpt))
    seen: list[str] = []
    train(cfg, data, collate, log=lambda _l: None, start=lambda _state: seen.append(_probe(ckpt)))
    assert seen[0].startswith("refused:") and str(ckpt) in seen[0] and f"pid {os.getpid()}" in seen[0], seen
    assert (ckpt / "iter_0000002").is_dir()
    assert _probe(ckpt) == "acquired"  # released when the run ends

    holder = _hold(ckpt)  # another run holds the dir: this one refuses before touching it
    try:
        with pytest.raises(RunLockError, match="slurm job 4242"):
            train(TrainConfig(seq_length=64, train_iters=3, warmup_iters=0, micro_batches=1, save_dir=str(ckpt)),
                  data, collate, log=lambda _l: None)
    finally:
        _kill(holder)
    assert not (ckpt / "iter_0000003").exists()


def _bridge_module(monkeypatch, ran: list):
    """prolong_nemo/training/bridge/main.py on stub Bridge modules; `pretrain` records a probe of the dir."""
    import dataclasses
    import importlib
    import types

    @dataclasses.dataclass(kw_only=True)
    class DatasetProvider:
        pass

    base = types.ModuleType("megatron.bridge.data.base")
    base.DatasetProvider, base.DatasetBuildContext = DatasetProvider, object
    pretrain = types.ModuleType("megatron.bridge.training.pretrain")
    pretrain.pretrain = lambda cfg, forward_step, callbacks: ran.append(_probe(Path(cfg)))
    for name in ("megatron.bridge", "megatron.bridge.data", "megatron.bridge.training"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, base.__name__, base)
    monkeypatch.setitem(sys.modules, pretrain.__name__, pretrain)
    # our Bridge modules are imported on the stubs: none before, and none left after the test
    for name in ("prolong_nemo.training.bridge.config", "prolong_nemo.training.bridge.main"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("prolong_nemo.training.bridge.main")
    # the config container is the checkpoint dir, for the stub pretrain to probe
    monkeypatch.setattr(module, "build_config_container", lambda recipe, start: recipe.checkpoint.dir)
    monkeypatch.setattr(module, "callbacks_for", lambda recipe, start: [])
    return module


def test_bridge_main_holds_the_lock_through_pretrain_and_refuses_a_held_dir(tmp_path, monkeypatch, capsys):
    ran: list[str] = []
    bridge = _bridge_module(monkeypatch, ran)
    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("RANK", "0")
    assert bridge.main(["stage_64k", f"checkpoint.dir={ckpt}", "checkpoint.init=none"]) == 0
    assert len(ran) == 1 and ran[0].startswith("refused:") and f"pid {os.getpid()}" in ran[0], ran
    assert _probe(ckpt) == "acquired"

    holder = _hold(ckpt)
    try:
        with pytest.raises(SystemExit) as e:
            bridge.main(["stage_64k", f"checkpoint.dir={ckpt}", "checkpoint.init=none"])
    finally:
        _kill(holder)
    assert str(e.value).startswith("error: ") and str(ckpt) in str(e.value) and "slurm job 4242" in str(e.value)
    assert len(ran) == 1  # pretrain never ran


RANKS = """
import os, sys, time
from prolong_nemo.training.run_lock import run_lock
with run_lock(sys.argv[1], log=print):  # rank and job identity from torchrun's environment
    print(f"rank {os.environ['RANK']} holds", flush=True)
    time.sleep(1)
"""


@pytest.mark.timeout(120)
def test_ranks_of_one_torchrun_job_agree(tmp_path):
    """Under torchrun the ranks find their job in rank 0's record (RANK, TORCHELASTIC_RUN_ID, MASTER_*)."""
    from model_fixtures import _free_port

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                              "LOCAL_RANK", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")}
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rank 0 holds" in proc.stdout and "rank 1 holds" in proc.stdout


def test_entry_main_reports_a_held_run_lock_in_one_line(monkeypatch, capsys):
    """`python -m prolong_nemo.training.train` (the torchrun child's CLI) prints user errors such as
    a held lock as one line with exit code 2, like `prolong-nemo train`."""
    from prolong_nemo.training import train as entry
    from prolong_nemo.training.run_lock import RunLockError

    def held(*args, **kwargs):
        raise RunLockError("runs/x: held by host h, pid 1")

    monkeypatch.setattr(entry, "train_recipe", held)
    assert entry.main(["stage_64k_cpu"]) == 2
    assert capsys.readouterr().err == "error: runs/x: held by host h, pid 1\n"
