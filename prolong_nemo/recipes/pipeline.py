"""`prolong-nemo launch pipeline [overrides]`: the whole ProLong recipe in one submission.

    prolong-nemo launch pipeline --executor slurm --runs-dir /lustre/prolong/runs \\
        cluster.slurm.account=ACCT cluster.container_image=REGISTRY/prolong-nemo:26.06 \\
        'cluster.mounts=[/lustre:/lustre]' stage_64k.checkpoint.init_from=/lustre/llama3-8b-instruct-megatron \\
        stage_64k.data.root=/lustre/prolong-data-64K stage_512k.data.root=/lustre/prolong-data-512K \\
        sft.data.root=/lustre/prolong-data stage_512k.cluster.nodes=2

Four jobs, each after the previous one (Slurm `--dependency=afterok`, NeMo-Run experiment
dependencies; the local executor runs them one by one and stops at the first failure):

    stage_64k -> stage_512k -> sft -> export_sft

- Overrides without a stage prefix apply to every stage; `<stage>.key=value` (also
  `+<stage>.key=value`, `~<stage>.key`) to that stage only, after the common ones.
- `checkpoint.dir` is per stage: `--runs-dir R` gives `R/<stage>/checkpoints`, otherwise the
  YAML default (`$PROLONG_RUNS/<stage>/checkpoints`) or `<stage>.checkpoint.dir=`. So are
  `data.root` and `data.mixture` (each stage reads its own data): refused without a prefix.
- Wiring: stage i's `checkpoint.init_from` is stage i-1's `checkpoint.dir` (stage_512k loads
  stage_64k's weights and Adam state, sft stage_512k's weights: `checkpoint.init` as in their
  YAML), so it cannot be overridden for them; stage_64k's is the converted HF model
  (`stage_64k.checkpoint.init_from=`, or `$PROLONG_INIT_64K`).
- A stage whose Adam state the next stage loads (`checkpoint.optim_read_by`) with
  `optim_reshardable: auto` gets the format decided against that stage as this pipeline runs it
  (its overrides included), pinned as `checkpoint.optim_reshardable=true|false`.
- Each chained job starts only once the previous stage has finished (its newest checkpoint is
  iteration `train.steps`, `preflight.check_after`): a stage stopped by its time limit saves and
  may exit 0, so afterok alone would chain from an intermediate checkpoint. Resubmitting the
  same command resumes every unfinished stage from its own checkpoints.
- The export converts sft's final checkpoint (`prolong-nemo convert megatron-to-hf`, into
  `--hf-dir`, default `hf/` beside sft's `checkpoint.dir`) and checks its logits against the
  checkpoint (`prolong-nemo convert verify`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Sequence

from prolong_nemo.recipes.config import RecipeError, optim_checkpoint_format
from prolong_nemo.recipes.launch import LaunchSpec, export_spec, launch_spec, plans_ok, submit
from prolong_nemo.recipes.stages import STAGE_RECIPES

# Keys that differ per stage: refused as common overrides.
PER_STAGE_KEYS = ("checkpoint.dir", "checkpoint.init_from", "data.root", "data.mixture", "name", "stage")


def split_overrides(overrides: Sequence[str], stages: Sequence[str] = STAGE_RECIPES
                    ) -> tuple[list[str], dict[str, list[str]]]:
    """(common overrides, {stage: its own}); `stage_64k.parallel.cp=2` -> stage_64k's `parallel.cp=2`."""
    common: list[str] = []
    own: dict[str, list[str]] = {s: [] for s in stages}
    for override in overrides:
        body = override.lstrip("+~")
        prefix = override[:len(override) - len(body)]
        head, dot, rest = body.partition(".")
        if dot and head in own:
            own[head].append(prefix + rest)
            continue
        key = body.split("=", 1)[0]
        if key in PER_STAGE_KEYS or key.startswith(tuple(k + "." for k in PER_STAGE_KEYS)):
            raise RecipeError(f"{override}: {key} differs per stage; give it per stage ({stages[0]}.{key}=...)"
                              + (" or use --runs-dir" if key == "checkpoint.dir" else ""))
        common.append(override)
    return common, own


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


@dataclass(frozen=True)
class Pipeline:
    jobs: tuple[LaunchSpec, ...]  # in submission order, the export last
    dependencies: dict[str, tuple[str, ...]]  # job name -> the jobs it waits for

    @property
    def names(self) -> list[str]:
        return [j.job_name for j in self.jobs]


def pipeline(overrides: Sequence[str] = (), executor: str = "slurm", *, runs_dir: str | None = None,
             hf_dir: str | None = None, tokenizer: str | None = None, ids_from: str | None = None,
             job_dir: str | None = None, stages: Sequence[str] = STAGE_RECIPES) -> Pipeline:
    common, own = split_overrides(overrides, stages)
    for stage in stages[1:]:
        wired = [o for o in own[stage] if _key(o) == "checkpoint.init_from"]
        if wired:
            raise RecipeError(f"{stage}.{wired[0]}: the pipeline starts {stage} from the previous stage's "
                              "checkpoint.dir; launch the stage alone to start it elsewhere")
    if runs_dir:
        for stage in stages:
            if not any(_key(o) == "checkpoint.dir" for o in own[stage]):
                own[stage].append(f"checkpoint.dir={runs_dir.rstrip('/')}/{stage}/checkpoints")

    def compose(extra: dict[str, list[str]]) -> list[LaunchSpec]:
        specs: list[LaunchSpec] = []
        for stage in stages:
            stage_overrides = common + own[stage] + extra.get(stage, [])
            after = None
            if specs:
                prev = specs[-1].recipe
                stage_overrides.append(f"checkpoint.init_from={prev.checkpoint.dir}")
                after = (prev.checkpoint.dir, prev.train.steps)
            try:
                specs.append(launch_spec(stage, stage_overrides, executor, job_dir=job_dir, after=after))
            except RecipeError as e:  # which stage: the override to give is `<stage>.key=...`
                raise RecipeError(f"{stage}: {e}") from None
        return specs

    specs = compose({})
    by_name = {s.recipe.name: s.recipe for s in specs}
    pins: dict[str, list[str]] = {}
    for spec in specs:
        ck = spec.recipe.checkpoint
        if ck.optim_reshardable == "auto" and ck.optim_read_by in by_name:
            fmt = optim_checkpoint_format(spec.recipe, reader=by_name[ck.optim_read_by])
            pins[spec.recipe.name] = [f"checkpoint.optim_reshardable={str(fmt.reshardable).lower()}"]
    if pins:
        specs = compose(pins)
    # One NeMo-Run folder for the experiment: nemo_run/ in the folder that holds the stages'.
    job_dir = os.path.abspath(job_dir or os.path.join(
        os.path.commonpath([os.path.dirname(s.recipe.checkpoint.dir) for s in specs]), "nemo_run"))
    specs = [dataclasses.replace(s, job_dir=job_dir) for s in specs]
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            if a.recipe.checkpoint.dir == b.recipe.checkpoint.dir:
                raise RecipeError(f"{a.recipe.name}.checkpoint.dir and {b.recipe.name}.checkpoint.dir are both "
                                  f"{a.recipe.checkpoint.dir}: each stage needs its own")
    export = export_spec(specs[-1], hf_dir, tokenizer=tokenizer, ids_from=ids_from, job_dir=job_dir)
    jobs = (*specs, export)
    deps = {job.job_name: (prev.job_name,) for prev, job in zip(jobs, jobs[1:])}
    return Pipeline(jobs=jobs, dependencies=deps)


def launch_pipeline(overrides: Sequence[str] = (), *, executor: str = "slurm", dryrun: bool = False,
                    job_dir: str | None = None, ssh_host: str | None = None, force: bool = False,
                    detach: bool = True, **options) -> int:
    p = pipeline(overrides, executor, job_dir=job_dir, **options)
    if not plans_ok(p.jobs, force):
        return 1
    prefix = p.jobs[0].recipe.cluster.slurm.job_name_prefix
    return submit(p.jobs, p.dependencies, title=f"{prefix}pipeline", dryrun=dryrun, ssh_host=ssh_host,
                  detach=detach)
