"""`prolong-nemo launch`: the submission spec, and the NeMo-Run objects and sbatch script it
builds (without submitting).

NeMo-Run lives in a side folder (recipes/requirements-launch.txt, installed with --no-deps),
so the NeMo-Run part runs in a subprocess with that folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prolong_nemo.recipes.config import RecipeError
from prolong_nemo.recipes.launch import CONTAINER_ENTRY, launch_spec, pinned_overrides
from prolong_nemo.recipes.stages import load_recipe

REPO = Path(__file__).resolve().parents[1]
NEMO_RUN_SITE = Path(os.environ.get("PROLONG_NEMO_RUN_SITE", REPO / ".venv" / "extras" / "nemo-run"))

SLURM_ARGS = ["cluster.slurm.account=acct", "cluster.slurm.partition=batch", "cluster.nodes=2",
              "cluster.mounts=[/lustre:/lustre]", "data.root=/lustre/data/512k", "checkpoint.dir=/lustre/runs/512k",
              "checkpoint.init_from=/lustre/runs/64k", "logging.tensorboard_dir=/lustre/tb", "optim.lr=1e-5"]


def test_slurm_spec_pins_resolved_paths():
    spec = launch_spec("stage_512k", SLURM_ARGS, "slurm", job_dir="/lustre/jobs")
    assert spec.entry == CONTAINER_ENTRY == "/opt/prolong-nemo/recipes/bridge_entry.py"
    assert spec.args[0] == "stage_512k"
    assert "optim.lr=1e-5" in spec.args and "cluster.nodes=2" in spec.args
    # each path appears once, as resolved here
    for key, value in (("data.root", "/lustre/data/512k"), ("checkpoint.dir", "/lustre/runs/512k"),
                       ("checkpoint.init_from", "/lustre/runs/64k")):
        assert [a for a in spec.args if a.startswith(key + "=")] == [f"{key}={value}"]
    assert spec.name == "prolong-stage_512k" and spec.job_dir == "/lustre/jobs"
    assert spec.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert spec.recipe.cluster.world_size == 16 and spec.recipe.data_parallel_size == 2


def test_slurm_refuses_relative_paths():
    with pytest.raises(RecipeError, match="relative: a Slurm job needs absolute"):
        launch_spec("stage_64k", ["cluster.slurm.account=a"], "slurm")


def test_local_spec_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROLONG_RUNS", raising=False)
    spec = launch_spec("stage_64k", [], "local")
    assert spec.entry == str(REPO / "recipes" / "bridge_entry.py")
    assert f"checkpoint.dir={tmp_path}/runs/stage_64k/checkpoints" in spec.args
    assert spec.job_dir == f"{tmp_path}/runs/stage_64k/nemo_run"
    # overrides the job would resolve differently are replaced by their resolved values
    recipe = load_recipe("stage_64k", ["checkpoint.dir=rel/ckpt"])
    pinned = pinned_overrides(recipe, ["checkpoint.dir=rel/ckpt", "train.steps=9"], absolute=True)
    assert pinned[0] == "train.steps=9" and f"checkpoint.dir={tmp_path}/rel/ckpt" in pinned


def test_unknown_executor():
    with pytest.raises(RecipeError, match="executor must be one of"):
        launch_spec("stage_64k", [], "kubernetes")


def _run_with_nemo_run(code: str) -> dict:
    if not (NEMO_RUN_SITE / "nemo_run").is_dir():
        try:
            import nemo_run  # noqa: F401
        except ImportError:
            pytest.skip(f"NeMo-Run not installed (pip install --no-deps --target {NEMO_RUN_SITE} "
                        "-r recipes/requirements-launch.txt)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(NEMO_RUN_SITE), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_slurm_experiment_and_sbatch_script(tmp_path):
    out = _run_with_nemo_run(f"""
        import json
        import nemo_run as run
        from nemo_run.run.torchx_backend.packaging import package
        from nemo_run.run.torchx_backend.schedulers.slurm import SlurmTunnelScheduler
        from prolong_nemo.recipes.launch import build_experiment, launch_spec

        spec = launch_spec("stage_512k", {SLURM_ARGS!r}, "slurm", job_dir={str(tmp_path)!r})
        exp, script, ex = build_experiment(spec)
        assert isinstance(ex, run.SlurmExecutor) and isinstance(script, run.Script)
        with exp:
            exp.add(script, name=spec.recipe.name)
            job = exp.jobs[0]
            app = package(job.id, job.task, executor=job.executor)
            sbatch = SlurmTunnelScheduler(session_name="test")._submit_dryrun(app, job.executor).request.materialize()
            je = job.executor  # the experiment's copy of our executor
        print(json.dumps(dict(sbatch=sbatch, nodes=je.nodes, image=je.container_image, mounts=je.container_mounts,
                              nproc=je.torchrun_nproc_per_node, script_path=script.path, script_args=script.args,
                              packager=type(ex.packager).__name__, retries=ex.retries)))
    """)
    assert out["nodes"] == 2 and out["nproc"] == 8 and out["image"] == "nvcr.io/nvidia/nemo:26.06"
    assert out["mounts"][0] == "/lustre:/lustre" and out["packager"] == "Packager"
    assert out["script_path"] == CONTAINER_ENTRY and out["script_args"][0] == "stage_512k"
    sbatch = out["sbatch"]
    for line in ("#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --job-name=prolong-stage_512k", "#SBATCH --signal=TERM@300",
                 "#SBATCH --time=04:00:00", "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export TORCHX_MAX_RETRIES=1"):
        assert line in sbatch, line
    assert "--container-image nvcr.io/nvidia/nemo:26.06" in sbatch
    assert "--container-mounts /lustre:/lustre" in sbatch
    assert ("torchrun --rdzv-backend c10d" in sbatch and "--nnodes 2 --nproc-per-node 8" in sbatch)
    assert (f"{CONTAINER_ENTRY} stage_512k " in sbatch and "optim.lr=1e-5" in sbatch
            and "checkpoint.dir=/lustre/runs/512k" in sbatch)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in sbatch  # a failed job is requeued once and resumes


def test_local_executor_objects(tmp_path):
    out = _run_with_nemo_run(f"""
        import json, os
        os.chdir({str(tmp_path)!r})
        import nemo_run as run
        from prolong_nemo.recipes.launch import build_experiment, launch_spec

        spec = launch_spec("stage_64k", ["cluster.gpus_per_node=4"], "local")
        exp, script, ex = build_experiment(spec)
        print(json.dumps(dict(kind=type(ex).__name__, nproc=ex.nproc_per_node(), launcher=type(ex.get_launcher()).__name__,
                              env=ex.env_vars, path=script.path, args=script.args)))
    """)
    assert out["kind"] == "LocalExecutor" and out["nproc"] == 4 and out["launcher"] == "Torchrun"
    assert out["path"] == str(REPO / "recipes" / "bridge_entry.py")
    assert out["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert f"checkpoint.dir={tmp_path}/runs/stage_64k/checkpoints" in out["args"]


def test_launch_refuses_a_refused_plan(capsys):
    from prolong_nemo.cli import main

    # parallel.cp=3 cannot run: refused before NeMo-Run is even imported
    assert main(["launch", "--executor", "slurm", "stage_512k", *SLURM_ARGS, "parallel.cp=3"]) == 2
    assert "not divisible by 2*cp=6" in capsys.readouterr().err


def test_dockerfile_keeps_the_container_stack():
    """Every pip install in the image is --no-deps, the stack is diffed, paths match launch."""
    import re

    text = (REPO / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = code.replace("\\\n", " ")
    installs = re.findall(r"pip install[^&\n]*", joined)
    assert len(installs) >= 4 and all("--no-deps" in cmd for cmd in installs), installs
    assert "diff -u /tmp/stack-before.txt /tmp/stack-after.txt" in joined
    base = re.search(r"ARG BASE_IMAGE=nvcr.io/nvidia/nemo:(\d+)\.(\d+)", text)
    assert base and (int(base.group(1)), int(base.group(2))) >= (26, 4)
    assert f"PROLONG_RECIPES_DIR={CONTAINER_ENTRY.rsplit('/', 1)[0]}" in joined
    for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repository"


# ---------------------------------------------------------------------------------------------
# `prolong-nemo train <recipe>` on a GPU machine: the torchrun it starts (single node)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def bridge_machine(monkeypatch):
    """`train_recipe` as on a GPU machine with Megatron-Bridge, outside torchrun; records the
    torchrun commands (and keyword arguments) instead of running them."""
    from prolong_nemo.training import train
    from prolong_nemo.training.bridge import torchrun

    monkeypatch.setattr(train, "bridge_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    calls: list = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(torchrun.subprocess, "run", fake_run)
    return calls


def test_train_hands_torchrun_the_job_environment(bridge_machine, monkeypatch, tmp_path):
    from prolong_nemo.training.train import train_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    assert train_recipe("stage_64k", [], log=lambda _: None) == 0
    [(cmd, kwargs)] = bridge_machine
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=8" in cmd
    env = kwargs.get("env")
    assert env is not None, "torchrun inherits the caller's environment without CUDA_DEVICE_MAX_CONNECTIONS"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # TP/SP communication overlap ordering
    assert env["PATH"] == os.environ["PATH"]  # everything else is inherited
    # the same job environment `launch` gives its ranks
    assert launch_spec("stage_64k", [], "local").env.items() <= env.items()
    # what the user set is kept; the recipe's cluster.env reaches the ranks
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    assert train_recipe("stage_64k", ["+cluster.env.NCCL_DEBUG=INFO"], log=lambda _: None) == 0
    env = bridge_machine[1][1]["env"]
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "32" and env["NCCL_DEBUG"] == "INFO"


def test_exit_after_is_refused_on_the_bridge_path(bridge_machine, monkeypatch, capsys):
    from prolong_nemo.cli import main
    from prolong_nemo.training.train import train_recipe

    with pytest.raises(RecipeError, match="--exit-after is not supported with Megatron-Bridge"):
        train_recipe("stage_64k", [], exit_after=3, log=lambda _: None)
    assert not bridge_machine  # nothing was started
    assert main(["train", "stage_64k", "--exit-after", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --exit-after is not supported with Megatron-Bridge") and err.count("\n") == 1
    # already one rank of a torchrun job: refused before Bridge is imported
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RecipeError, match="--exit-after"):
        train_recipe("stage_64k", [], exit_after=3)
    assert not bridge_machine
    # without it the same machine starts torchrun
    monkeypatch.delenv("LOCAL_RANK")
    assert train_recipe("stage_64k", [], log=lambda _: None) == 0 and len(bridge_machine) == 1


def test_torchrun_gives_the_sigterm_save_time_before_sigkill():
    """torchrun forwards a SIGTERM to its ranks and SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    (30 s by default): the job environment leaves the save more, and still less than Slurm's
    lead before the time limit. (The save itself: tests/test_bridge_pretrain.py.)"""
    from prolong_nemo.recipes.launch import SIGTERM_LEAD_S, job_environment
    from prolong_nemo.recipes.stages import load_recipe

    env = job_environment(load_recipe("stage_64k"), {})
    assert 30 < int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < SIGTERM_LEAD_S
    assert job_environment(load_recipe("stage_64k"), {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "900"})[
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "900"


def test_entry_script_imports_nothing_heavy_when_re_imported_by_spawn():
    """megatron's checkpoint writer starts "spawn" helpers, which run the entry file again as
    `__mp_main__`: that must not import Bridge (tens of seconds per save on a GPU node)."""
    import runpy

    before = set(sys.modules)
    runpy.run_path(str(REPO / "recipes" / "bridge_entry.py"), run_name="__mp_main__")
    assert not {m for m in set(sys.modules) - before if m.startswith(("prolong_nemo.training.bridge", "megatron"))}
