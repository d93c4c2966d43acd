"""One training run per checkpoint dir: an exclusive lock on `<checkpoint.dir>/.prolong-run.lock`.

Two runs saving into one dir would interleave their `iter_*` folders and tracker. Global rank 0
takes `flock(LOCK_EX | LOCK_NB)` on the lock file, keeps the descriptor open for the whole run
and writes its holder record (host, pid, job identity) into it; the kernel drops the flock when
the process dies, so a SIGKILLed or requeued job leaves no stale lock (a stale record is only
text: the next rank 0 takes the lock and rewrites it). The process group does not exist yet
where Bridge runs this (it is created inside `pretrain`), so the other ranks agree through the
record: each waits until it names its own job (`job_identity`) and refuses when it keeps naming
another job that holds the dir.

File-system caveat: the flock must be coherent across nodes: Lustre mounted with `flock` (not
`localflock`), NFSv4, GPFS. Where the file system has no flock (ENOLCK / EOPNOTSUPP / ENOSYS)
the run logs one warning line and trains unlocked rather than refusing to train.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

from prolong_nemo.errors import UserError

LOCK_NAME = ".prolong-run.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunLockError(UserError):
    """Another run holds the checkpoint dir (the message names the dir and the holder)."""


def job_identity(environ: Mapping[str, str]) -> str | None:
    """What every rank of one job shares: Slurm job id, torchelastic run id, rendezvous address."""
    parts = []
    if environ.get("SLURM_JOB_ID"):
        parts.append(f"slurm job {environ['SLURM_JOB_ID']}")
    if environ.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):  # torchrun's default is "none"
        parts.append(f"torchelastic run {environ['TORCHELASTIC_RUN_ID']}")
    if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        parts.append(f"master {environ['MASTER_ADDR']}:{environ['MASTER_PORT']}")
    return ", ".join(parts) or None


def describe(record: dict | None) -> str:
    if not record:
        return "no holder recorded"
    job = f", {record['job']}" if record.get("job") else ""
    return f"host {record.get('host')}, pid {record.get('pid')}{job}"


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def run_lock(save_dir: str | os.PathLike, *, rank: int | None = None, environ: Mapping[str, str] | None = None,
             log: Callable[[str], None] = print, wait_s: float = 60.0, grace_s: float = 30.0,
             poll_s: float = 0.2) -> Iterator[None]:
    """Hold `save_dir` for this run (every rank calls it; `rank` defaults to $RANK, else 0).

    Rank 0 refuses at once when another process holds the dir. Another rank waits up to `wait_s`
    for the record to name its job; a record naming another job for `grace_s` on end (not a
    stale one its rank 0 is about to rewrite) is refused. A long grace only delays ranks whose
    rank 0 has refused already (torchrun then ends them); a short one could refuse a job whose
    rank 0 starts late after a SIGKILLed run of another job left its record.
    """
    environ = os.environ if environ is None else environ
    rank = int(environ.get("RANK", "0")) if rank is None else rank
    path = Path(save_dir) / LOCK_NAME
    job = job_identity(environ)
    if rank != 0:
        _wait_for_holder(path, job, wait_s, grace_s, poll_s)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockError(f"{Path(save_dir)}: checkpoint dir is in use by another run "
                               f"({describe(read_record(path))}); wait for it to end or set another "
                               "checkpoint.dir") from None
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            log(f"[prolong] warning: {path.parent}: the file system does not support flock ({e.strerror}); "
                "training unlocked: make sure no other run uses this checkpoint dir")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": job}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean end leaves no record; the flock goes with the close
    finally:
        os.close(fd)


def _wait_for_holder(path: Path, job: str | None, wait_s: float, grace_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + wait_s
    other_since: float | None = None
    while True:
        record = read_record(path)
        now = time.monotonic()
        if record and job is not None and record.get("job") == job:
            return
        if record and record.get("job") != job:
            other_since = now if other_since is None else other_since
            if now - other_since >= grace_s:
                raise RunLockError(f"{path.parent}: checkpoint dir is in use by another run ({describe(record)}); "
                                   f"this rank belongs to {job or 'an unidentified job'}")
        else:
            other_since = None
        if now >= deadline:
            raise RunLockError(f"{path.parent}: rank 0 of {job or 'this job'} did not take the run lock within "
                               f"{wait_s:g} s (record: {describe(record)})")
        time.sleep(poll_s)
