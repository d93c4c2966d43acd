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

from prolong_nemo.recipes import preflight
from prolong_nemo.recipes.config import RecipeError
from prolong_nemo.recipes.launch import CONTAINER_ENTRY, launch_spec, pinned_overrides
from prolong_nemo.recipes.pipeline import pipeline
from prolong_nemo.recipes.stages import load_recipe

REPO = Path(__file__).resolve().parents[1]
NEMO_RUN_SITE = Path(os.environ.get("PROLONG_NEMO_RUN_SITE", REPO / ".venv" / "extras" / "nemo-run"))

IMAGE = "registry.example.com/prolong-nemo:26.06"
SLURM_ARGS = ["cluster.slurm.account=acct", "cluster.slurm.partition=batch", "cluster.nodes=2",
              f"cluster.container_image={IMAGE}", "cluster.mounts=[/lustre:/lustre]", "data.root=/lustre/data/512k",
              "checkpoint.dir=/lustre/runs/512k", "checkpoint.init_from=/lustre/runs/64k", "optim.lr=1e-5"]


def test_slurm_spec_pins_resolved_paths():
    spec = launch_spec("stage_512k", SLURM_ARGS, "slurm", job_dir="/lustre/jobs")
    assert spec.entry == CONTAINER_ENTRY == "/opt/prolong-nemo/recipes/bridge_entry.py"
    assert spec.args[0] == "stage_512k"
    assert "optim.lr=1e-5" in spec.args and "cluster.nodes=2" in spec.args
    # each path appears once, as resolved here
    for key, value in (("data.root", "/lustre/data/512k"), ("checkpoint.dir", "/lustre/runs/512k"),
                       ("checkpoint.init_from", "/lustre/runs/64k"),
                       ("logging.tensorboard_dir", "/lustre/runs/512k/tensorboard")):  # beside the checkpoints
        assert [a for a in spec.args if a.startswith(key + "=")] == [f"{key}={value}"]
    assert spec.image == IMAGE and spec.mounts == ("/lustre:/lustre",)
    assert spec.name == "prolong-stage_512k" and spec.job_dir == "/lustre/jobs"
    assert spec.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert spec.recipe.cluster.world_size == 16 and spec.recipe.data_parallel_size == 2


def test_slurm_refuses_relative_paths():
    with pytest.raises(RecipeError, match="relative: a Slurm job needs absolute"):
        launch_spec("stage_64k", ["cluster.slurm.account=a", f"cluster.container_image={IMAGE}"], "slurm")


def test_run_outputs_follow_checkpoint_dir(monkeypatch):
    """Setting checkpoint.dir to a shared absolute path is enough: TensorBoard (and NeMo-Run's
    job dir) follow it, nothing is left relative."""
    monkeypatch.delenv("PROLONG_RUNS", raising=False)
    spec = launch_spec("stage_64k", ["cluster.slurm.account=a", f"cluster.container_image={IMAGE}",
                                     "data.root=/shared/d64", "checkpoint.init_from=/shared/init",
                                     "checkpoint.dir=/shared/runs/64k"], "slurm")
    assert spec.recipe.logging.tensorboard_dir == "/shared/runs/64k/tensorboard"
    assert "logging.tensorboard_dir=/shared/runs/64k/tensorboard" in spec.args
    assert spec.job_dir == "/shared/runs/nemo_run"
    assert load_recipe("stage_64k").logging.tensorboard_dir == "runs/stage_64k/checkpoints/tensorboard"


@pytest.mark.parametrize("image, message", [
    (None, "a Slurm launch needs cluster.container_image=<the image the Dockerfile builds>"),
    ("nvcr.io/nvidia/nemo:26.06", "cluster.container_image=nvcr.io/nvidia/nemo:26.06 is the stock NGC image"),
])
def test_slurm_needs_the_built_image(image, message, capsys):
    from prolong_nemo.cli import main

    args = [a for a in SLURM_ARGS if not a.startswith("cluster.container_image=")]
    args += [f"cluster.container_image={image}"] if image else []
    with pytest.raises(RecipeError) as e:
        launch_spec("stage_512k", args, "slurm")
    assert str(e.value).startswith(message)
    assert main(["launch", "--executor", "slurm", "--dry-run", "stage_512k", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"launch: {e.value}\n"  # one line
    assert launch_spec("stage_64k", [], "local").image is None  # a local job runs this checkout


def test_code_fingerprint_tracks_the_code_and_recipes(tmp_path, monkeypatch):
    base = preflight.code_fingerprint()
    names = [name for name, _ in preflight.code_files()]
    assert "prolong_nemo/recipes/launch.py" in names and "recipes/stage_64k.yaml" in names
    assert "recipes/bridge_entry.py" in names and not any(n.endswith(".pyc") for n in names)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for p in (REPO / "recipes").iterdir():
        if p.is_file():
            (recipes / p.name).write_bytes(p.read_bytes())
    monkeypatch.setenv("PROLONG_RECIPES_DIR", str(recipes))
    assert preflight.code_fingerprint() == base
    (recipes / "sft.yaml").write_text((recipes / "sft.yaml").read_text() + "\n# edited\n")
    assert preflight.code_fingerprint() != base


def test_preflight_refuses_another_image_code(tmp_path, capsys):
    recorded = tmp_path / "CODE_FINGERPRINT"
    code = preflight.code_fingerprint()
    assert preflight.main(["--code", code, "--recorded-in", str(recorded)]) == 2
    assert capsys.readouterr().err == (f"preflight: {recorded} is missing: cluster.container_image was not built "
                                       "from this repository's Dockerfile\n")
    recorded.write_text("0" * 64 + "\n")
    assert preflight.main(["--code", code, "--recorded-in", str(recorded)]) == 2
    assert capsys.readouterr().err == (f"preflight: {recorded}: the image holds prolong-nemo 000000000000, the job "
                                       f"was planned with {code[:12]}: rebuild cluster.container_image from this "
                                       "checkout (Dockerfile)\n")
    recorded.write_text(code + "\n")
    assert preflight.main(["--code", code, "--recorded-in", str(recorded)]) == 0
    assert capsys.readouterr().out == f"preflight OK: code {code[:12]}\n"


def _checkpoint(root: Path, iteration: int) -> str:
    (root / f"iter_{iteration:07d}").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return str(root)


def test_preflight_starts_a_chained_stage_only_after_the_previous_finished(tmp_path, capsys):
    prev, own = tmp_path / "64k", tmp_path / "512k"
    recorded = tmp_path / "CODE_FINGERPRINT"
    recorded.write_text("abc")
    argv = ["--code", "abc", "--recorded-in", str(recorded), "--own", str(own), "--after", f"{prev}:5000"]
    assert preflight.main(argv) == 2
    assert capsys.readouterr().err == f"preflight: {prev} holds no checkpoint: the previous stage has not saved its final one\n"
    _checkpoint(prev, 4875)  # stopped by its time limit: saved and exited
    assert preflight.main(argv) == 2
    assert capsys.readouterr().err == (f"preflight: {prev}: the previous stage's newest checkpoint is iteration 4875 of "
                                       "5000; resubmit that stage until it finishes, then this one\n")
    (prev / "latest_checkpointed_iteration.txt").write_text("5000")
    (prev / "iter_0005000").mkdir()
    assert preflight.main(argv) == 0
    assert capsys.readouterr().out == f"preflight OK: code abc; {prev} finished at iteration 5000\n"
    # the stage's own checkpoint: a resume, whatever the previous stage holds now
    (prev / "latest_checkpointed_iteration.txt").write_text("10")
    _checkpoint(own, 125)
    assert preflight.main(argv) == 0
    assert capsys.readouterr().out == f"preflight OK: code abc; {own} holds a checkpoint: resuming this stage\n"


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
    assert out["nodes"] == 2 and out["nproc"] == 8 and out["image"] == IMAGE
    assert out["mounts"][0] == "/lustre:/lustre" and out["packager"] == "Packager"
    assert out["script_path"] == CONTAINER_ENTRY and out["script_args"][0] == "stage_512k"
    sbatch = out["sbatch"]
    for line in ("#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --job-name=prolong-stage_512k", "#SBATCH --signal=TERM@300",
                 "#SBATCH --time=04:00:00", "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export TORCHX_MAX_RETRIES=1"):
        assert line in sbatch, line
    assert f"--container-image {IMAGE}" in sbatch
    # before training, one srun in the image checks that it holds this checkout's code
    code = preflight.code_fingerprint()
    assert (f"srun --nodes=1 --ntasks=1 --container-image={IMAGE} --container-mounts=/lustre:/lustre python -m "
            f"prolong_nemo.recipes.preflight --code {code} --own /lustre/runs/512k || exit 2") in sbatch
    assert sbatch.index("prolong_nemo.recipes.preflight") < sbatch.index("torchrun")
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


PIPELINE_ARGS = ["cluster.slurm.account=acct", f"cluster.container_image={IMAGE}", "cluster.mounts=[/lustre:/lustre]",
                 "optim.clip_grad=0.5", "stage_64k.checkpoint.init_from=/lustre/llama3-8b-instruct-megatron",
                 "stage_64k.data.root=/lustre/d64", "stage_512k.data.root=/lustre/d512", "sft.data.root=/lustre/dsft",
                 "stage_512k.cluster.nodes=2", "+sft.cluster.env.NCCL_DEBUG=INFO"]


def _arg(spec, key):
    [value] = [a.split("=", 1)[1] for a in spec.args if a.startswith(key + "=")]
    return value


def test_pipeline_jobs_order_and_wiring():
    p = pipeline(PIPELINE_ARGS, "slurm", runs_dir="/lustre/runs")
    assert p.names == ["stage_64k", "stage_512k", "sft", "export_sft"]
    assert p.dependencies == {"stage_512k": ("stage_64k",), "sft": ("stage_512k",), "export_sft": ("sft",)}
    s64, s512, sft, export = p.jobs
    assert [j.recipe.checkpoint.dir for j in p.jobs[:3]] == [
        "/lustre/runs/stage_64k/checkpoints", "/lustre/runs/stage_512k/checkpoints", "/lustre/runs/sft/checkpoints"]
    # each stage starts from the previous stage's checkpoint.dir, pinned in its job's arguments
    assert _arg(s64, "checkpoint.init_from") == "/lustre/llama3-8b-instruct-megatron"
    assert _arg(s512, "checkpoint.init_from") == "/lustre/runs/stage_64k/checkpoints"
    assert _arg(sft, "checkpoint.init_from") == "/lustre/runs/stage_512k/checkpoints"
    assert [j.recipe.checkpoint.init for j in p.jobs[:3]] == ["weights", "weights_and_optimizer", "weights"]
    # ... and only once it finished (the preflight's --after)
    assert [j.after for j in p.jobs] == [None, ("/lustre/runs/stage_64k/checkpoints", 5000),
                                         ("/lustre/runs/stage_512k/checkpoints", 2500), ("/lustre/runs/sft/checkpoints", 250)]
    assert s512.preflight_args()[-2:] == ["--after", "/lustre/runs/stage_64k/checkpoints:5000"]
    # common overrides reach every stage; prefixed ones only theirs
    assert [j.recipe.optim.clip_grad for j in p.jobs] == [0.5] * 4
    assert [j.recipe.cluster.nodes for j in p.jobs[:3]] == [1, 2, 1]
    assert [j.recipe.data.root for j in p.jobs[:3]] == ["/lustre/d64", "/lustre/d512", "/lustre/dsft"]
    assert "NCCL_DEBUG" not in s512.env and sft.env["NCCL_DEBUG"] == "INFO"
    assert [_arg(j, "logging.tensorboard_dir") for j in p.jobs[:3]] == [
        f"/lustre/runs/{n}/checkpoints/tensorboard" for n in ("stage_64k", "stage_512k", "sft")]
    # stage_512k runs the YAML's tp: stage_64k's Adam state stays DP-reshardable, pinned explicitly
    assert _arg(s64, "checkpoint.optim_reshardable") == "false"
    # one NeMo-Run folder, in the folder holding the stages'
    assert {j.job_dir for j in p.jobs} == {"/lustre/runs/nemo_run"}
    # the export: sft's final checkpoint -> HF folder beside it, then the logit check
    assert export.task == "export" and export.image == IMAGE and export.recipe.name == "sft"
    assert export.commands == (
        "prolong-nemo convert megatron-to-hf /lustre/runs/sft/checkpoints /lustre/runs/sft/hf --overwrite --quiet",
        "prolong-nemo convert verify /lustre/runs/sft/hf /lustre/runs/sft/checkpoints")


def test_pipeline_decides_the_optimizer_format_against_the_next_stage_as_run():
    p = pipeline([*PIPELINE_ARGS, "stage_512k.parallel.tp=4", "stage_512k.parallel.cp=2"], "slurm",
                 runs_dir="/lustre/runs", hf_dir="/lustre/hf", tokenizer="/lustre/tok")
    s64, s512, _, export = p.jobs
    assert (s512.recipe.parallel.tp, s512.recipe.parallel.cp) == (4, 2)
    assert _arg(s64, "checkpoint.optim_reshardable") == "true" and s64.recipe.checkpoint.optim_reshardable is True
    assert export.commands[0] == ("prolong-nemo convert megatron-to-hf /lustre/runs/sft/checkpoints /lustre/hf "
                                  "--overwrite --quiet --tokenizer /lustre/tok")


@pytest.mark.parametrize("override, message", [
    ("checkpoint.dir=/lustre/x", "checkpoint.dir=/lustre/x: checkpoint.dir differs per stage; give it per stage "
                                 "(stage_64k.checkpoint.dir=...) or use --runs-dir"),
    ("data.root=/lustre/d", "data.root=/lustre/d: data.root differs per stage; give it per stage (stage_64k.data.root=...)"),
    ("stage_512k.checkpoint.init_from=/x", "stage_512k.checkpoint.init_from=/x: the pipeline starts stage_512k from the "
                                           "previous stage's checkpoint.dir; launch the stage alone to start it elsewhere"),
    ("sft.checkpoint.dir=/lustre/runs/stage_64k/checkpoints",
     "stage_64k.checkpoint.dir and sft.checkpoint.dir are both /lustre/runs/stage_64k/checkpoints: each stage needs "
     "its own"),
])
def test_pipeline_refuses_overrides_that_break_the_chain(override, message, capsys):
    from prolong_nemo.cli import main

    with pytest.raises(RecipeError) as e:
        pipeline([*PIPELINE_ARGS, override], "slurm", runs_dir="/lustre/runs")
    assert str(e.value) == message
    assert main(["launch", "pipeline", "--dry-run", "--runs-dir", "/lustre/runs", *PIPELINE_ARGS, override]) == 2
    assert capsys.readouterr().err == f"launch: {message}\n"


def test_pipeline_names_the_stage_of_a_refused_setting(monkeypatch):
    monkeypatch.delenv("PROLONG_DATA_512K", raising=False)
    args = [a for a in PIPELINE_ARGS if not a.startswith("stage_512k.data.root=")]
    with pytest.raises(RecipeError) as e:
        pipeline(args, "slurm", runs_dir="/lustre/runs")
    assert str(e.value) == ("stage_512k: data.root='data/prolong-data-512K' is relative: a Slurm job needs "
                            "absolute (shared) paths")
    with pytest.raises(RecipeError, match="^stage_64k: a Slurm launch needs cluster.container_image="):
        pipeline([a for a in PIPELINE_ARGS if not a.startswith("cluster.container_image")], "slurm",
                 runs_dir="/lustre/runs")


def test_pipeline_override_prefixes():
    from prolong_nemo.recipes.pipeline import split_overrides

    common, own = split_overrides(["optim.lr=1e-5", "+stage_64k.cluster.env.A=1", "~sft.data.cache_dir",
                                   "stage_512k.parallel.cp=2", "++cluster.env.B=2"])
    assert common == ["optim.lr=1e-5", "++cluster.env.B=2"]
    assert own == {"stage_64k": ["+cluster.env.A=1"], "stage_512k": ["parallel.cp=2"], "sft": ["~data.cache_dir"]}
    with pytest.raises(RecipeError, match=r"^--hf-dir=/lustre/runs/sft/checkpoints/hf overlaps sft's checkpoint.dir "
                                          r"/lustre/runs/sft/checkpoints$"):
        pipeline(PIPELINE_ARGS, "slurm", runs_dir="/lustre/runs", hf_dir="/lustre/runs/sft/checkpoints/hf")


def test_pipeline_options_belong_to_the_pipeline(capsys):
    from prolong_nemo.cli import main

    assert main(["launch", "stage_64k", "--executor", "local", "--runs-dir", "/x", "--dry-run"]) == 2
    assert capsys.readouterr().err == "launch: --runs-dir: only for `launch pipeline`\n"


def test_pipeline_dry_run_experiment(tmp_path):
    """NeMo-Run's experiment: four jobs, each depending on the one before (Slurm afterok); the dry
    run prints what runs where and NeMo-Run's sbatch scripts, and writes nothing in the job dir."""
    out = _run_with_nemo_run(f"""
        import contextlib, io, json
        import nemo_run as run
        from nemo_run.run.torchx_backend.packaging import package
        from nemo_run.run.torchx_backend.schedulers.slurm import SlurmTunnelScheduler
        from prolong_nemo.recipes import launch
        from prolong_nemo.recipes.pipeline import pipeline

        p = pipeline({PIPELINE_ARGS!r}, "slurm", runs_dir={str(tmp_path / "runs")!r})
        seen = {{}}
        real_experiment = run.Experiment
        class Recording(real_experiment):
            def dryrun(self, *a, **k):
                super().dryrun(*a, **dict(k, delete_exp_dir=False))  # the temporary folder goes anyway
                seen["jobs"] = [(j.id, list(j.dependencies), type(j.executor).__name__, j.executor.dependency_type,
                                 j.executor.container_image, type(j.executor.packager).__name__) for j in self.jobs]
                seen["sbatch"] = {{j.id: SlurmTunnelScheduler(session_name="t")._submit_dryrun(
                    package(j.id, j.task, executor=j.executor), j.executor).request.materialize() for j in self.jobs}}
        run.Experiment = Recording
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = launch.submit(p.jobs, p.dependencies, title="prolong-pipeline", dryrun=True)
        print(json.dumps(dict(rc=rc, printed=buf.getvalue(), **seen)))
    """)
    assert out["rc"] == 0
    assert out["jobs"] == [
        ["stage_64k", [], "SlurmExecutor", "afterok", IMAGE, "Packager"],
        ["stage_512k", ["stage_64k"], "SlurmExecutor", "afterok", IMAGE, "Packager"],
        ["sft", ["stage_512k"], "SlurmExecutor", "afterok", IMAGE, "Packager"],
        ["export_sft", ["sft"], "SlurmExecutor", "afterok", IMAGE, "Packager"],
    ]
    runs = tmp_path / "runs"
    assert not runs.exists()  # a dry run writes nothing where the jobs would run
    sb = out["sbatch"]
    assert "#SBATCH --nodes=2" in sb["stage_512k"] and "#SBATCH --nodes=1" in sb["sft"]
    assert f"--after {runs}/stage_64k/checkpoints:5000 || exit 2" in sb["stage_512k"]
    assert f"checkpoint.init_from={runs}/stage_512k/checkpoints" in sb["sft"]
    assert "torchrun" not in sb["export_sft"] and "--gpus-per-node" not in sb["export_sft"]
    assert f"--after {runs}/sft/checkpoints:250 || exit 2" in sb["export_sft"]
    printed = out["printed"]
    for line in ("job stage_64k (slurm: 1 node(s) x 8 GPUs)",
                 "job stage_512k (slurm: 2 node(s) x 8 GPUs, after stage_64k (Slurm afterok))",
                 "job export_sft (slurm: 1 node, 1 process, after sft (Slurm afterok))",
                 f"  image:     {IMAGE}", "  mounts:    /lustre:/lustre (+ NeMo-Run's job dir as /nemo_run)",
                 "  sbatch:    --dependency=afterok:<job id of stage_512k>",
                 f"  command:   prolong-nemo convert megatron-to-hf {runs}/sft/checkpoints {runs}/sft/hf --overwrite "
                 f"--quiet && prolong-nemo convert verify {runs}/sft/hf {runs}/sft/checkpoints"):
        assert line in printed.splitlines(), line
    assert "code:      none packaged (NeMo-Run Packager): the image's /opt/prolong-nemo" in printed


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
    # the fingerprint the preflight compares, written after the plugin is installed
    record = re.search(r'python -c "from prolong_nemo.recipes.preflight import code_fingerprint; '
                       r'print\(code_fingerprint\(\)\)"\s+> (\S+)', joined)
    assert record and record.group(1) == preflight.CONTAINER_FINGERPRINT == CONTAINER_ENTRY.replace("recipes/bridge_entry.py", "CODE_FINGERPRINT")
    assert joined.index("-e .") < record.start()


def test_the_image_layout_computes_the_checkout_fingerprint(tmp_path):
    """The image holds prolong_nemo/ and recipes/ under /opt/prolong-nemo (editable install,
    PROLONG_RECIPES_DIR): the fingerprint computed there is the checkout's."""
    import shutil

    code = "import prolong_nemo; from prolong_nemo.recipes.preflight import code_fingerprint; " \
           "print(prolong_nemo.__file__); print(code_fingerprint())"
    for attempt in range(3):  # others may edit the checkout meanwhile: same code before and after the copy
        image = tmp_path / str(attempt)
        before = preflight.code_fingerprint()
        shutil.copytree(REPO / "prolong_nemo", image / "prolong_nemo")
        shutil.copytree(REPO / "recipes", image / "recipes")
        if preflight.code_fingerprint() == before:
            break
    env = dict(os.environ, PYTHONPATH=str(image), PROLONG_RECIPES_DIR=str(image / "recipes"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=image, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(image / "prolong_nemo" / "__init__.py"), before]


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


def test_local_pipeline_runs_in_order_and_stops_at_a_failure(tmp_path):
    """The local executor: one job after the other, each chained stage only after the previous
    one finished; a failed or unfinished stage stops the chain. The stages' entry is replaced by
    a script that saves a checkpoint tracker at the iteration it is given and exits."""
    fake = tmp_path / "fake_stage.py"
    fake.write_text(textwrap.dedent("""
        import os, sys
        name, ckpt, iteration, code = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        if int(os.environ.get("RANK", "0")) == 0:
            os.makedirs(os.path.join(ckpt, f"iter_{iteration:07d}"), exist_ok=True)
            open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w").write(str(iteration))
            open(os.environ["ORDER_LOG"], "a").write(name + "\\n")
        sys.exit(code)
    """))
    out = _run_with_nemo_run(f"""
        import contextlib, dataclasses, io, json, os
        from prolong_nemo.recipes.config import RecipeError
        from prolong_nemo.recipes.launch import submit
        from prolong_nemo.recipes.pipeline import pipeline

        def fake_jobs(runs, outcome):
            p = pipeline([], "local", runs_dir=runs)
            jobs = []
            for spec in p.jobs:
                r = spec.recipe
                r = dataclasses.replace(r, cluster=dataclasses.replace(r.cluster, gpus_per_node=1))
                if spec.task == "train":
                    it, code = outcome.get(r.name, (r.train.steps, 0))
                    spec = dataclasses.replace(spec, recipe=r, entry={str(fake)!r},
                                               args=[r.name, r.checkpoint.dir, str(it), str(code)])
                else:
                    spec = dataclasses.replace(spec, recipe=r, commands=("echo export >> $ORDER_LOG",))
                jobs.append(spec)
            return jobs, p.dependencies

        result = {{}}
        for case, outcome in (("ok", {{}}), ("fails", {{"stage_512k": (2500, 1)}}), ("stopped", {{"stage_64k": (4875, 0)}})):
            log = os.path.join({str(tmp_path)!r}, case + ".log")
            os.environ["ORDER_LOG"] = log
            jobs, deps = fake_jobs(os.path.join({str(tmp_path)!r}, case), outcome)
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = submit(jobs, deps, title="prolong-pipeline")
            except RecipeError as e:
                rc = str(e)
            order = open(log).read().split() if os.path.exists(log) else []
            result[case] = dict(rc=rc, order=order, err=[l for l in err.getvalue().splitlines() if l.startswith("launch:")])
        print(json.dumps(result))
    """)
    assert out["ok"] == dict(rc=0, order=["stage_64k", "stage_512k", "sft", "export"], err=[])
    assert out["fails"]["rc"] == 1 and out["fails"]["order"] == ["stage_64k", "stage_512k"]
    assert out["fails"]["err"] == ["launch: stage_512k ended FAILED; not started: sft, export_sft"]
    runs = tmp_path / "stopped"
    assert out["stopped"] == dict(rc=f"{runs}/stage_64k/checkpoints: the previous stage's newest checkpoint is "
                                     "iteration 4875 of 5000; resubmit that stage until it finishes, then this one",
                                  order=["stage_64k"], err=[])


def test_pipeline_submission_chains_the_slurm_jobs_afterok(tmp_path):
    """The real submission path against a fake `sbatch` (it records its arguments and answers
    job ids 1001, 1002, ...): four sbatch calls in order, each after the previous job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\nn=$(( $(cat "$FAKE_SLURM_LOG" 2>/dev/null | wc -l) + 1001 ))\n'
                                    'echo "$n $*" >> "$FAKE_SLURM_LOG"\necho $n\n')
    for name in ("squeue", "sacct", "scontrol"):
        (bin_dir / name).write_text("#!/bin/bash\nexit 0\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    log, runs, jobs = tmp_path / "sbatch.log", tmp_path / "runs", tmp_path / "jobs"
    code = f"""
        import json, os
        os.environ.update(PATH={str(bin_dir)!r} + os.pathsep + os.environ["PATH"], FAKE_SLURM_LOG={str(log)!r},
                          NEMORUN_HOME={str(tmp_path / "home")!r})
        from prolong_nemo.recipes.pipeline import launch_pipeline
        rc = launch_pipeline({PIPELINE_ARGS!r}, executor="slurm", runs_dir={str(runs)!r}, job_dir={str(jobs)!r})
        print(json.dumps(dict(rc=rc)))
    """
    assert _run_with_nemo_run(code) == {"rc": 0}
    calls = [line.split() for line in log.read_text().splitlines()]
    scripts = [c[-1] for c in calls]
    assert [(c[0], c[1:-1]) for c in calls] == [
        ("1001", ["--requeue", "--parsable"]),
        ("1002", ["--requeue", "--parsable", "--dependency=afterok:1001"]),
        ("1003", ["--requeue", "--parsable", "--dependency=afterok:1002"]),
        ("1004", ["--requeue", "--parsable", "--dependency=afterok:1003"]),
    ]
    assert [os.path.basename(s) for s in scripts] == [
        "stage_64k_sbatch.sh", "stage_512k_sbatch.sh", "sft_sbatch.sh", "export_sft_sbatch.sh"]
    # the scripts sbatch was given exist: the experiment wrote them where the tunnel submits from
    exp_dir = Path(scripts[0]).parent
    assert exp_dir.parent == jobs / "experiments" / "prolong-pipeline" and all(Path(s).parent == exp_dir for s in scripts)
    sbatch = [Path(s).read_text() for s in scripts]
    assert f"--after {runs}/stage_64k/checkpoints:5000 || exit 2" in sbatch[1]
    assert f"checkpoint.init_from={runs}/stage_64k/checkpoints" in sbatch[1]
    assert "bash /nemo_run/scripts/export_sft.sh" in sbatch[3]  # /nemo_run: the task's folder, mounted
    assert (exp_dir / "export_sft" / "scripts" / "export_sft.sh").read_text().splitlines()[1:] == [
        "set -e",
        f"prolong-nemo convert megatron-to-hf {runs}/sft/checkpoints {runs}/sft/hf --overwrite --quiet",
        f"prolong-nemo convert verify {runs}/sft/hf {runs}/sft/checkpoints"]
