"""`prolong-nemo launch <recipe> [overrides]`: submit a recipe through NeMo-Run;
`prolong-nemo launch pipeline [overrides]`: the whole recipe (`prolong_nemo.recipes.pipeline`).

    prolong-nemo launch stage_64k --executor slurm cluster.nodes=2 \\
        cluster.slurm.account=ACCT cluster.slurm.partition=batch \\
        cluster.container_image=registry.example.com/prolong-nemo:26.06 \\
        'cluster.mounts=[/lustre/prolong:/lustre/prolong]' \\
        data.root=/lustre/prolong/data/prolong-data-64K checkpoint.dir=/lustre/prolong/runs/stage_64k/ckpt

A training job runs `torchrun <entry> <recipe> <overrides>` (NeMo-Run's torchrun launcher): on
Slurm `/opt/prolong-nemo/recipes/bridge_entry.py` inside `cluster.container_image`, locally the
checkout's `recipes/bridge_entry.py`. Paths are resolved here and passed to the job as explicit
overrides, so the job trains exactly the plan that was checked. Submitting the same command
again resumes from the newest checkpoint in `checkpoint.dir` (weights, optimizer, scheduler and
data position); Slurm requeues and SIGTERM-triggered saves use the same mechanism.

Where the code comes from (Slurm): the image the Dockerfile builds, a required and checked
setting, rather than code shipped with each job (NeMo-Run's GitArchivePackager /
PatternPackager). Shipping the code would still leave the stock NGC image without the plugin's
own dependencies (mosaicml-streaming and its codecs, tiktoken, llama-models), so every job
would `pip install` them at start: on every node, from compute nodes that often have no
network, and without the build's guarantee that torch / transformers / megatron / TE are
unchanged (the Dockerfile diffs the stack and fails the build). So: `cluster.container_image`
must be set, and the stock `nvcr.io/nvidia/nemo` image is refused (it has no
/opt/prolong-nemo); the image records the fingerprint of the code it holds
(`code_fingerprint`, in /opt/prolong-nemo/CODE_FINGERPRINT), and every job's first step, one
`srun` in the image before training (`preflight`), refuses to start when the image's code is
not this checkout's, so the code that was planned here is the code that runs. The packager is
NeMo-Run's pass-through `Packager`: nothing is shipped. `--dry-run` prints, per job, the image,
mounts, exact command, environment, packaged code (none) and dependencies, then NeMo-Run's own
dry run (the sbatch script).

NeMo-Run (`pip install nemo-run "leptonai<0.47"`) is imported only when launching.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.recipes.preflight import CONTAINER_FINGERPRINT, code_fingerprint

# Where the Dockerfile installs the plugin inside the container.
CONTAINER_ROOT = "/opt/prolong-nemo"
CONTAINER_ENTRY = f"{CONTAINER_ROOT}/recipes/bridge_entry.py"
assert CONTAINER_FINGERPRINT.startswith(CONTAINER_ROOT + "/")
# NGC's NeMo Framework images: what the Dockerfile builds on, without the plugin.
STOCK_IMAGE = "nvcr.io/nvidia/nemo:"
EXECUTORS = ("local", "slurm")


def require_nemo_run():
    try:
        import nemo_run
    except ImportError as e:
        raise RecipeError(
            f"NeMo-Run is not importable ({e}); install it with: pip install nemo-run 'leptonai<0.47'") from None
    return nemo_run


def pinned_overrides(recipe: RecipeConfig, overrides: Sequence[str], *, absolute: bool) -> list[str]:
    """The user's overrides plus every resolved path, so the job cannot resolve them differently."""
    paths = {
        "data.root": recipe.data.root,
        "checkpoint.dir": recipe.checkpoint.dir,
        "logging.tensorboard_dir": recipe.logging.tensorboard_dir,
        "checkpoint.init_from": recipe.checkpoint.init_from,
        "data.cache_dir": recipe.data.cache_dir,
    }
    pinned = [f"{key}={absolute_path(key, value, local=absolute)}" for key, value in paths.items() if value is not None]
    keys = {p.split("=", 1)[0] for p in pinned}
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in keys] + pinned


# Slurm sends the job SIGTERM this long before its time limit (Bridge then saves and exits).
SIGTERM_LEAD_S = 300
# How long torchrun waits for its ranks after forwarding a SIGTERM before it SIGKILLs them
# (its default is 30 s: too short for an 8B distributed-optimizer save on a shared file system).
SAVE_ON_SIGTERM_S = 240

# What every rank of a training job gets unless the recipe or the caller's environment sets it.
JOB_ENV_DEFAULTS = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # TP/SP communication overlap ordering
    "NCCL_NVLS_ENABLE": "0",
    # read by torchrun (torch.distributed.launcher) itself, so it must be in its environment
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SAVE_ON_SIGTERM_S),
}


def job_environment(recipe: RecipeConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a job's ranks: `base` (e.g. the caller's `os.environ`), the recipe's
    `cluster.env` over it, and `JOB_ENV_DEFAULTS` where neither sets a variable. Used by `launch`
    (NeMo-Run executors) and by single-node `prolong-nemo train` (its torchrun child)."""
    env = dict(base or {})
    env.update({str(k): str(v) for k, v in recipe.cluster.env.items()})
    for key, value in JOB_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def container_image(recipe: RecipeConfig) -> str:
    """`cluster.container_image` for a Slurm job: set, and not the stock NGC image."""
    image = recipe.cluster.container_image
    if not image:
        raise RecipeError("a Slurm launch needs cluster.container_image=<the image the Dockerfile builds> "
                          "(docker build -t prolong-nemo:26.06 . then push it where the cluster pulls from)")
    if image.startswith(STOCK_IMAGE):
        raise RecipeError(f"cluster.container_image={image} is the stock NGC image, which does not hold "
                          f"prolong-nemo ({CONTAINER_ENTRY}): build the Dockerfile on it and set the result")
    return image


@dataclass(frozen=True)
class LaunchSpec:
    """One job, before NeMo-Run objects are built (easy to inspect and to test).

    task "train": torchrun `entry args` over the recipe's nodes x GPUs. task "export": `commands`
    in order in one process on one node (the stage's cluster settings). `after`: (checkpoint dir,
    steps) that must be finished before the job starts (`preflight.check_after`)."""

    recipe: RecipeConfig
    executor: str
    entry: str
    args: list[str]
    env: dict[str, str]
    job_dir: str
    name: str
    image: str | None = None  # None: local, the checkout
    fingerprint: str = ""
    task: str = "train"
    commands: tuple[str, ...] = ()
    after: tuple[str, int] | None = None
    mounts: tuple[str, ...] = ()

    @property
    def job_name(self) -> str:  # the task name inside an experiment
        return self.recipe.name if self.task == "train" else f"export_{self.recipe.name}"

    def preflight_args(self) -> list[str]:
        args = ["--code", self.fingerprint]
        if self.task == "train":
            args += ["--own", self.recipe.checkpoint.dir]
        if self.after:
            args += ["--after", f"{self.after[0]}:{self.after[1]}"]
        return args

    def preflight_command(self) -> list[str] | None:
        """The srun that runs `preflight` once in the image before the job (Slurm only)."""
        if self.image is None:
            return None
        mounts = [f"--container-mounts={','.join(self.mounts)}"] if self.mounts else []
        return ["srun", "--nodes=1", "--ntasks=1", f"--container-image={self.image}", *mounts,
                "python", "-m", "prolong_nemo.recipes.preflight", *self.preflight_args()]

    def command(self) -> str:
        if self.task != "train":
            return " && ".join(self.commands)
        c = self.recipe.cluster
        nodes = 1 if self.executor == "local" else c.nodes
        return shlex.join(["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(c.gpus_per_node),
                           self.entry, *self.args])


def absolute_path(key: str, value: str, *, local: bool) -> str:
    """`value` as the job must see it: absolute (made so locally; refused for Slurm)."""
    if "://" in value or os.path.isabs(value):
        return value
    if not local:
        raise RecipeError(f"{key}={value!r} is relative: a Slurm job needs absolute (shared) paths")
    return os.path.abspath(value)


def _job_base(recipe: RecipeConfig, executor: str, job_dir: str | None) -> dict[str, Any]:
    """What every job of `recipe` shares: executor, environment, job dir, image, code."""
    slurm = executor == "slurm"
    return dict(recipe=recipe, executor=executor, env=job_environment(recipe),
                job_dir=os.path.abspath(job_dir or os.path.join(os.path.dirname(recipe.checkpoint.dir), "nemo_run")),
                image=container_image(recipe) if slurm else None, fingerprint=code_fingerprint(),
                mounts=tuple(recipe.cluster.mounts))


def launch_spec(recipe_name: str, overrides: Sequence[str], executor: str, *, job_dir: str | None = None,
                entry: str | None = None, after: tuple[str, int] | None = None) -> LaunchSpec:
    from prolong_nemo.recipes.stages import load_recipe, recipes_dir

    if executor not in EXECUTORS:
        raise RecipeError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    recipe = load_recipe(recipe_name, overrides)
    local = executor == "local"
    args = [recipe_name, *pinned_overrides(recipe, overrides, absolute=local)]
    if local:  # the recipe as the job sees it: its paths made absolute
        recipe = load_recipe(recipe_name, args[1:])
    return LaunchSpec(
        **_job_base(recipe, executor, job_dir), args=args, after=after,
        entry=entry or (str(recipes_dir() / "bridge_entry.py") if local else CONTAINER_ENTRY),
        name=f"{recipe.cluster.slurm.job_name_prefix}{recipe.name}",
    )


def local_path_prefix() -> str:
    """Where a local job finds `torchrun` and `prolong-nemo`: this Python's bin folder (the venv's,
    also when it is not activated)."""
    return str(Path(sys.executable).parent)


def prolong_nemo_command(executor: str) -> str:
    """How a job calls the CLI: the image's console script, locally the one beside this Python."""
    here = Path(local_path_prefix()) / "prolong-nemo"
    return str(here) if executor == "local" and here.is_file() else "prolong-nemo"


def export_spec(stage: LaunchSpec, hf_dir: str | None = None, *, tokenizer: str | None = None,
                ids_from: str | None = None, job_dir: str | None = None) -> LaunchSpec:
    """Export `stage`'s final checkpoint to a Hugging Face folder and check its logits:
    `prolong-nemo convert megatron-to-hf` then `prolong-nemo convert verify`, after the stage."""
    recipe, local = stage.recipe, stage.executor == "local"
    ckpt = recipe.checkpoint.dir
    hf = absolute_path("--hf-dir", hf_dir or os.path.join(os.path.dirname(ckpt), "hf"), local=local)
    if os.path.commonpath([hf, ckpt]) in (hf, ckpt):  # the export replaces the folder
        raise RecipeError(f"--hf-dir={hf} overlaps {recipe.name}'s checkpoint.dir {ckpt}")
    cli = prolong_nemo_command(stage.executor)
    export = [cli, "convert", "megatron-to-hf", ckpt, hf, "--overwrite", "--quiet"]
    for option, value in (("--tokenizer", tokenizer), ("--ids-from", ids_from)):
        if value:
            export += [option, absolute_path(option, value, local=local)]
    return LaunchSpec(
        **_job_base(recipe, stage.executor, job_dir or stage.job_dir), entry="bash", args=[], task="export",
        commands=(shlex.join(export), shlex.join([cli, "convert", "verify", hf, ckpt])),
        after=(ckpt, recipe.train.steps), name=f"{recipe.cluster.slurm.job_name_prefix}export_{recipe.name}",
    )


def build_executor(spec: LaunchSpec, *, ssh_host: str | None = None):
    run = require_nemo_run()
    c = spec.recipe.cluster
    train = spec.task == "train"
    if spec.executor == "local":
        env = dict(spec.env, PATH=local_path_prefix())  # torchx prepends it to PATH
        if not train:
            return run.LocalExecutor(ntasks_per_node=1, env_vars=env)
        return run.LocalExecutor(ntasks_per_node=c.gpus_per_node, nodes=1, launcher="torchrun", env_vars=env)
    if c.slurm.account is None:
        raise RecipeError("a Slurm launch needs cluster.slurm.account=<account>")
    if ssh_host:
        user, _, host = ssh_host.rpartition("@")
        tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=spec.job_dir)
    else:  # submitting from a login node of the cluster
        # sbatch reads the scripts where the experiment writes them (NeMo-Run copies nothing
        # for a local tunnel): <job dir>/experiments/<title>/<id>, see `experiment_base_dir`
        tunnel = run.LocalTunnel(job_dir=os.path.join(spec.job_dir, "experiments"))
    preflight = spec.preflight_command()
    layout = dict(
        nodes=c.nodes,
        ntasks_per_node=c.gpus_per_node,  # the torchrun launcher turns this into --nproc-per-node
        gpus_per_node=c.gpus_per_node,
        launcher="torchrun",
        retries=1,  # one requeue after a failure; it resumes from the newest checkpoint
        signal=f"TERM@{SIGTERM_LEAD_S}",  # SIGTERM before the time limit: Bridge saves, then exits
    ) if train else dict(nodes=1, ntasks_per_node=1)  # export: one process, the node's memory
    return run.SlurmExecutor(
        account=c.slurm.account,
        partition=c.slurm.partition,
        time=c.slurm.time,
        job_name_prefix=c.slurm.job_name_prefix,
        exclusive=True,
        container_image=spec.image,
        container_mounts=list(spec.mounts),
        env_vars=dict(spec.env),
        job_dir=spec.job_dir,
        tunnel=tunnel,
        packager=run.Packager(),  # the code is in the image (checked by the preflight): nothing to ship
        setup_lines=f"{shlex.join(preflight)} || exit 2  # the image's code is this checkout's; the stage may start",
        **layout,
    )


def build_script(spec: LaunchSpec):
    run = require_nemo_run()
    if spec.task == "train":
        return run.Script(path=spec.entry, args=list(spec.args), entrypoint="python")
    return run.Script(inline="set -e\n" + "\n".join(spec.commands) + "\n")


def describe(spec: LaunchSpec, after: Sequence[str] = ()) -> str:
    """What runs where, as the dry run prints it before NeMo-Run's own (the sbatch script)."""
    c = spec.recipe.cluster
    slurm = spec.executor == "slurm"
    if spec.task == "train":
        where = f"{c.nodes if slurm else 1} node(s) x {c.gpus_per_node} GPUs"
    else:
        where = "1 node, 1 process"
    deps = f", after {', '.join(after)} ({'Slurm afterok' if slurm else 'in order, each when the previous succeeded'})"
    lines = [f"job {spec.job_name} ({spec.executor}: {where}{deps if after else ''})"]
    if slurm:
        lines += [f"  image:     {spec.image}",
                  f"  mounts:    {', '.join(spec.mounts) or '-'} (+ NeMo-Run's job dir as /nemo_run)",
                  f"  preflight: {shlex.join(spec.preflight_command() or [])}",
                  *([f"  sbatch:    --dependency=afterok:<job id of {', '.join(after)}>"] if after else []),
                  f"  code:      none packaged (NeMo-Run Packager): the image's {CONTAINER_ROOT}, "
                  f"fingerprint {spec.fingerprint[:12]} checked by the preflight"]
    else:
        root = Path(__file__).resolve().parents[2]
        lines += ["  image:     none (this machine); PATH=" + local_path_prefix() + ":$PATH",
                  f"  code:      none packaged: this checkout ({root}), fingerprint {spec.fingerprint[:12]}"]
        if spec.after:
            lines.append(f"  before:    {spec.after[0]} must hold iteration {spec.after[1]} (preflight.check_after)")
    lines += [f"  command:   {spec.command()}",
              f"  env:       {' '.join(f'{k}={v}' for k, v in sorted(spec.env.items()))}"]
    return "\n".join(lines)


def experiment_base_dir(spec: LaunchSpec, ssh_host: str | None) -> str | None:
    """Where NeMo-Run keeps the experiment on this machine (it adds experiments/<title>/<id>):
    the job dir itself, except over SSH (NeMo-Run's home here; it rsyncs the experiment to the
    job dir on the cluster)."""
    return None if ssh_host and spec.executor == "slurm" else spec.job_dir


def build_experiment(spec: LaunchSpec, *, ssh_host: str | None = None, base_dir: str | None = None
                     ) -> tuple[Any, Any, Any]:
    """(experiment, script, executor), not yet submitted."""
    run = require_nemo_run()
    executor = build_executor(spec, ssh_host=ssh_host)
    script = build_script(spec)
    exp = run.Experiment(spec.name, executor=executor, log_level="WARN",
                         base_dir=base_dir or experiment_base_dir(spec, ssh_host))
    return exp, script, executor


def plans_ok(specs: Sequence[LaunchSpec], force: bool) -> bool:
    from prolong_nemo.recipes.plan import make_plan

    ok = True
    for spec in specs:
        if spec.task == "train":
            plan = make_plan(spec.recipe)
            print(plan.report())
            ok = ok and plan.ok
    if not ok and not force:
        print("not launching: the plan is refused (--force to submit anyway)", file=sys.stderr)
    return ok or force


def submit(specs: Sequence[LaunchSpec], dependencies: Mapping[str, Sequence[str]], *, title: str,
           dryrun: bool = False, ssh_host: str | None = None, detach: bool = True) -> int:
    """One NeMo-Run experiment holding `specs` (each job after its `dependencies`; Slurm:
    afterok). A local multi-job run goes job by job instead and stops at the first failure
    (NeMo-Run's local executor would start the next job after a failed one)."""
    run = require_nemo_run()
    if not dryrun and specs[0].executor == "local" and len(specs) > 1:
        return _run_local_in_order(specs, ssh_host=ssh_host)
    for spec in specs:
        print(describe(spec, dependencies.get(spec.job_name, ())))
    # A dry run keeps NeMo-Run's experiment folder in a temporary directory: nothing is written
    # where the jobs would run (that folder may exist only on the cluster).
    with tempfile.TemporaryDirectory(prefix="prolong-launch-") as tmp:
        base_dir = tmp if dryrun else experiment_base_dir(specs[0], ssh_host)
        with run.Experiment(title, log_level="WARN", base_dir=base_dir) as exp:
            for spec in specs:
                exp.add(build_script(spec), executor=build_executor(spec, ssh_host=ssh_host), name=spec.job_name,
                        dependencies=list(dependencies.get(spec.job_name, ())) or None)
            if dryrun:
                exp.console.width = max(exp.console.width, 200)  # the sbatch script, unwrapped
                exp.dryrun()
            else:
                exp.run(detach=detach)
    return 0


def _run_local_in_order(specs: Sequence[LaunchSpec], *, ssh_host: str | None) -> int:
    from prolong_nemo.recipes.preflight import check_after

    for i, spec in enumerate(specs):
        if spec.after:  # what the preflight checks on Slurm: the previous stage finished
            own = spec.recipe.checkpoint.dir if spec.task == "train" else None
            print(f"{spec.job_name}: {check_after(*spec.after, own=own)}")
        exp, script, _ = build_experiment(spec, ssh_host=ssh_host)
        with exp:
            exp.add(script, name=spec.job_name)
            exp.run(detach=False)
        state = exp.jobs[0].state
        state = getattr(state, "name", str(state))  # torchx AppState
        if state != "SUCCEEDED":
            later = ", ".join(s.job_name for s in specs[i + 1:]) or "-"
            print(f"launch: {spec.job_name} ended {state}; not started: {later}", file=sys.stderr)
            return 1
    return 0


def launch(recipe_name: str, overrides: Sequence[str] = (), *, executor: str = "slurm", dryrun: bool = False,
           job_dir: str | None = None, ssh_host: str | None = None, force: bool = False,
           detach: bool = True) -> int:
    spec = launch_spec(recipe_name, overrides, executor, job_dir=job_dir)
    if not plans_ok([spec], force):
        return 1
    return submit([spec], {}, title=spec.name, dryrun=dryrun, ssh_host=ssh_host, detach=detach)


PIPELINE_OPTIONS = ("runs_dir", "hf_dir", "tokenizer", "ids_from")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Submit a recipe through NeMo-Run (local torchrun or Slurm with a container); "
                          "`pipeline` submits 64K -> 512K -> SFT -> HF export as dependent jobs.")
    parser.add_argument("recipe", help="recipe name in recipes/, a YAML path, or `pipeline` (all stages + export)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (cluster.nodes=2 cluster.slurm.account=X ...); "
                        "pipeline: `<stage>.key=value` applies to one stage (stage_64k.parallel.cp=2)")
    parser.add_argument("--executor", choices=EXECUTORS, default="slurm")
    parser.add_argument("--dry-run", "--dryrun", dest="dryrun", action="store_true",
                        help="print what runs where (and the sbatch script) without submitting")
    parser.add_argument("--job-dir", default=None, help="NeMo-Run job directory (default: next to checkpoint.dir)")
    parser.add_argument("--ssh-host", default=None, help="user@login-node to submit over SSH (default: local sbatch)")
    parser.add_argument("--force", action="store_true", help="submit even when `plan` refuses")
    group = parser.add_argument_group("pipeline")
    group.add_argument("--runs-dir", help="each stage's checkpoint.dir is <runs-dir>/<stage>/checkpoints")
    group.add_argument("--hf-dir", help="the export's Hugging Face folder (default: beside sft's checkpoint.dir, hf/)")
    group.add_argument("--tokenizer", help="tokenizer folder the export copies (convert megatron-to-hf --tokenizer)")
    group.add_argument("--ids-from", help="HF folder whose bos/eos ids the export carries (convert --ids-from)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    common = dict(executor=args.executor, dryrun=args.dryrun, job_dir=args.job_dir, ssh_host=args.ssh_host,
                  force=args.force)
    try:
        if args.recipe == "pipeline":
            from prolong_nemo.recipes.pipeline import launch_pipeline

            return launch_pipeline(args.overrides, **common, **{k: getattr(args, k) for k in PIPELINE_OPTIONS})
        given = [f"--{k.replace('_', '-')}" for k in PIPELINE_OPTIONS if getattr(args, k)]
        if given:
            raise RecipeError(f"{', '.join(given)}: only for `launch pipeline`")
        return launch(args.recipe, args.overrides, **common)
    except RecipeError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
