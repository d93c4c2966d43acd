"""`prolong-nemo launch <recipe> [overrides]`: submit a recipe through NeMo-Run.

    prolong-nemo launch stage_64k --executor slurm cluster.nodes=2 \\
        cluster.slurm.account=ACCT cluster.slurm.partition=batch \\
        'cluster.mounts=[/lustre/prolong:/lustre/prolong]' \\
        data.root=/lustre/prolong/data/prolong-data-64K checkpoint.dir=/lustre/prolong/runs/stage_64k/ckpt

The job runs `torchrun recipes/bridge_entry.py <recipe> <overrides>` (NeMo-Run's torchrun
launcher) inside the NGC NeMo container with this plugin installed (see Dockerfile). Paths are
resolved here and passed to the job as explicit overrides, so the job trains exactly the plan
that was checked. Submitting the same command again resumes from the newest checkpoint in
`checkpoint.dir` (weights, optimizer, scheduler and data position); Slurm requeues and
SIGTERM-triggered saves use the same mechanism.

NeMo-Run (`pip install nemo-run "leptonai<0.47"`) is imported only when launching.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from prolong_nemo.recipes.config import RecipeConfig, RecipeError

# Where the Dockerfile installs the plugin inside the container.
CONTAINER_ROOT = "/opt/prolong-nemo"
CONTAINER_ENTRY = f"{CONTAINER_ROOT}/recipes/bridge_entry.py"
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
    pinned = []
    for key, value in paths.items():
        if value is None:
            continue
        if "://" not in value and not os.path.isabs(value):
            if not absolute:
                raise RecipeError(f"{key}={value!r} is relative: a Slurm job needs absolute (shared) paths")
            value = os.path.abspath(value)
        pinned.append(f"{key}={value}")
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


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a submission needs, before NeMo-Run objects are built (easy to inspect)."""

    recipe: RecipeConfig
    executor: str
    entry: str
    args: list[str]
    env: dict[str, str]
    job_dir: str
    name: str


def launch_spec(recipe_name: str, overrides: Sequence[str], executor: str, *, job_dir: str | None = None,
                entry: str | None = None) -> LaunchSpec:
    from prolong_nemo.recipes.stages import load_recipe, recipes_dir

    if executor not in EXECUTORS:
        raise RecipeError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    recipe = load_recipe(recipe_name, overrides)
    local = executor == "local"
    args = [recipe_name, *pinned_overrides(recipe, overrides, absolute=local)]
    return LaunchSpec(
        recipe=recipe, executor=executor,
        entry=entry or (str(recipes_dir() / "bridge_entry.py") if local else CONTAINER_ENTRY),
        args=args, env=job_environment(recipe),
        job_dir=os.path.abspath(job_dir or os.path.join(os.path.dirname(recipe.checkpoint.dir), "nemo_run")),
        name=f"{recipe.cluster.slurm.job_name_prefix}{recipe.name}",
    )


def build_executor(spec: LaunchSpec, *, ssh_host: str | None = None):
    run = require_nemo_run()
    c = spec.recipe.cluster
    if spec.executor == "local":
        return run.LocalExecutor(ntasks_per_node=c.gpus_per_node, nodes=1, launcher="torchrun",
                                 env_vars=dict(spec.env))
    if c.slurm.account is None:
        raise RecipeError("a Slurm launch needs cluster.slurm.account=<account>")
    if ssh_host:
        user, _, host = ssh_host.rpartition("@")
        tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=spec.job_dir)
    else:  # submitting from a login node of the cluster
        tunnel = run.LocalTunnel(job_dir=spec.job_dir)
    return run.SlurmExecutor(
        account=c.slurm.account,
        partition=c.slurm.partition,
        time=c.slurm.time,
        job_name_prefix=c.slurm.job_name_prefix,
        nodes=c.nodes,
        ntasks_per_node=c.gpus_per_node,  # the torchrun launcher turns this into --nproc-per-node
        gpus_per_node=c.gpus_per_node,
        exclusive=True,
        container_image=c.container_image,
        container_mounts=list(c.mounts),
        env_vars=dict(spec.env),
        job_dir=spec.job_dir,
        tunnel=tunnel,
        launcher="torchrun",
        packager=run.Packager(),  # the code is in the container image: nothing to ship
        retries=1,  # one requeue after a failure; it resumes from the newest checkpoint
        signal=f"TERM@{SIGTERM_LEAD_S}",  # SIGTERM before the time limit: Bridge saves, then exits
    )


def build_script(spec: LaunchSpec):
    run = require_nemo_run()
    return run.Script(path=spec.entry, args=list(spec.args), entrypoint="python")


def build_experiment(spec: LaunchSpec, *, ssh_host: str | None = None) -> tuple[Any, Any, Any]:
    """(experiment, script, executor), not yet submitted."""
    run = require_nemo_run()
    executor = build_executor(spec, ssh_host=ssh_host)
    script = build_script(spec)
    exp = run.Experiment(spec.name, executor=executor, log_level="WARN",
                         base_dir=os.path.join(spec.job_dir, "experiments"))
    return exp, script, executor


def launch(recipe_name: str, overrides: Sequence[str] = (), *, executor: str = "slurm", dryrun: bool = False,
           job_dir: str | None = None, ssh_host: str | None = None, force: bool = False,
           detach: bool = True) -> int:
    from prolong_nemo.recipes.plan import make_plan

    spec = launch_spec(recipe_name, overrides, executor, job_dir=job_dir)
    plan = make_plan(spec.recipe)
    print(plan.report())
    if not plan.ok and not force:
        print("not launching: the plan is refused (--force to submit anyway)", file=sys.stderr)
        return 1
    exp, script, _ = build_experiment(spec, ssh_host=ssh_host)
    with exp:
        exp.add(script, name=spec.recipe.name)
        if dryrun:
            exp.dryrun()
        else:
            exp.run(detach=detach)
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Submit a recipe through NeMo-Run (local torchrun or Slurm with a container)."
    parser.add_argument("recipe", help="recipe name in recipes/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (cluster.nodes=2 cluster.slurm.account=X ...)")
    parser.add_argument("--executor", choices=EXECUTORS, default="slurm")
    parser.add_argument("--dryrun", action="store_true", help="print the job (sbatch script) without submitting")
    parser.add_argument("--job-dir", default=None, help="NeMo-Run job directory (default: next to checkpoint.dir)")
    parser.add_argument("--ssh-host", default=None, help="user@login-node to submit over SSH (default: local sbatch)")
    parser.add_argument("--force", action="store_true", help="submit even when `plan` refuses")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        return launch(args.recipe, args.overrides, executor=args.executor, dryrun=args.dryrun,
                      job_dir=args.job_dir, ssh_host=args.ssh_host, force=args.force)
    except RecipeError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
