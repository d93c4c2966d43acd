"""The first step of every job `launch` submits to Slurm, and of each pipeline stage run locally.

    python -m prolong_nemo.recipes.preflight --code <fingerprint> [--own DIR] [--after DIR:STEPS]

Slurm runs it once (`srun --ntasks=1`) in the job's container image before training and the job
stops, exit code 2, when it refuses:

- `--code`: the image's prolong-nemo must be the submitting checkout's (`code_fingerprint`, which
  the Dockerfile records in /opt/prolong-nemo/CODE_FINGERPRINT): the plan checked at submission
  is the code that runs. An image without the file was not built from this repository.
- `--after DIR:STEPS`: a chained stage starts only from a finished previous stage, i.e. DIR's
  newest checkpoint is iteration STEPS. A stage that stopped early (time limit, preemption)
  saves and exits, and may exit 0: without this a dependent job would chain from its last
  intermediate checkpoint. Skipped when `--own` (this stage's `checkpoint.dir`) already holds a
  checkpoint: the job is a resume of this stage, not its start.

Nothing here imports Megatron; reading a checkpoint root's tracker imports torch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from prolong_nemo.recipes.config import RecipeError

# Where the Dockerfile writes the fingerprint of the code it installs.
CONTAINER_FINGERPRINT = "/opt/prolong-nemo/CODE_FINGERPRINT"
_ITER = re.compile(r"iter_(\d+)$")


def code_files() -> list[tuple[str, Path]]:
    """(name, path) of what a job runs: the package's .py files and the recipes (YAML + entry)."""
    import prolong_nemo
    from prolong_nemo.recipes.stages import recipes_dir

    package = Path(prolong_nemo.__file__).resolve().parent
    files = [(f"prolong_nemo/{p.relative_to(package).as_posix()}", p) for p in package.rglob("*.py")]
    recipes = recipes_dir()
    files += [(f"recipes/{p.name}", p) for p in recipes.iterdir() if p.suffix in (".py", ".yaml")]
    return sorted(files)


def code_fingerprint() -> str:
    """sha256 over the names and bytes of `code_files()`: the same in a checkout and in the image
    built from it (editable install in /opt/prolong-nemo, PROLONG_RECIPES_DIR)."""
    digest = hashlib.sha256()
    for name, path in code_files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_code(expected: str, recorded_in: str = CONTAINER_FINGERPRINT) -> None:
    try:
        recorded = Path(recorded_in).read_text().strip()
    except OSError:
        raise RecipeError(f"{recorded_in} is missing: cluster.container_image was not built from this "
                          "repository's Dockerfile") from None
    if recorded != expected:
        raise RecipeError(f"{recorded_in}: the image holds prolong-nemo {recorded[:12]}, the job was planned with "
                          f"{expected[:12]}: rebuild cluster.container_image from this checkout (Dockerfile)")


def newest_iteration(root: str) -> int | None:
    """The iteration of the checkpoint a reader of `root` loads (its tracker); None: no checkpoint."""
    from prolong_nemo.convert.mapping import ConversionError
    from prolong_nemo.convert.megatron_io import latest_iter_dir

    try:
        found = latest_iter_dir(Path(root))
    except ConversionError as e:
        raise RecipeError(str(e)) from None
    if found is None:
        return None
    match = _ITER.match(found.name)
    if not match:
        raise RecipeError(f"{root}: the tracker names {found.name}, not an iter_* checkpoint")
    return int(match.group(1))


def check_after(after: str, steps: int, own: str | None = None) -> str:
    """Refuse to start a chained stage before the stage it starts from has finished."""
    if own and os.path.isdir(own) and newest_iteration(own) is not None:
        return f"{own} holds a checkpoint: resuming this stage"
    done = newest_iteration(after) if os.path.isdir(after) else None
    if done is None:
        raise RecipeError(f"{after} holds no checkpoint: the previous stage has not saved its final one")
    if done < steps:
        raise RecipeError(f"{after}: the previous stage's newest checkpoint is iteration {done} of {steps}; "
                          "resubmit that stage until it finishes, then this one")
    return f"{after} finished at iteration {done}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prolong_nemo.recipes.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--code", required=True, help="fingerprint of the code the job was planned with")
    parser.add_argument("--recorded-in", default=CONTAINER_FINGERPRINT, help="the image's fingerprint file")
    parser.add_argument("--own", help="this stage's checkpoint.dir")
    parser.add_argument("--after", help="DIR:STEPS, the previous stage's checkpoint.dir and its train.steps")
    args = parser.parse_args(argv)
    try:
        check_code(args.code, args.recorded_in)
        notes = [f"code {args.code[:12]}"]
        if args.after:
            after, _, steps = args.after.rpartition(":")
            notes.append(check_after(after, int(steps), args.own))
    except RecipeError as e:
        print(f"preflight: {e}", file=sys.stderr)
        return 2
    print("preflight OK: " + "; ".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
