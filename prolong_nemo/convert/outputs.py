"""All-or-nothing output folders, tokenizer files and progress bars for the converters."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from prolong_nemo.convert.mapping import ConversionError

log = logging.getLogger(__name__)

# Files a Hugging Face tokenizer folder may hold (Llama-3 uses tokenizer.json + config).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "original/tokenizer.model",
    "chat_template.jinja",
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_overlap(out: Path, inputs: Iterable[Path | None], error: type[Exception] = ConversionError) -> None:
    """With --overwrite the output folder is deleted: refuse one that is, holds or lies inside an input
    (the comparison is on resolved paths, so `d/`, `./d` and a symlink to `d` are all `d`)."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if src == target or src.is_relative_to(target) or target.is_relative_to(src):
            raise error(f"output {Path(out).absolute()} overlaps input {Path(given).absolute()}: "
                        "--overwrite would delete the input; choose another output folder")


# Work folders next to a destination: `.NAME.partial-PID[-suffix]` (being written) and
# `.NAME.old-PID[-suffix]` (the previous output, moved aside during an --overwrite swap).
_WORK_DIR = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-[^/]*)?")


def _process_start(pid: int) -> float | None:
    """Wall-clock start time of a live process (Linux /proc), None when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _writer_gone(pid: int, folder: Path) -> bool:
    """True when the process that named `folder` can no longer be writing it. A live process with the
    same PID counts as gone only if it started after the folder was last modified (PID reuse): the real
    writer created the folder, so it started before any of the folder's modification times. Start times
    are known to ~1 s (boot time is whole seconds), hence the margin, which errs towards keeping."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    try:
        return start is not None and start > folder.lstat().st_mtime + 2.0
    except FileNotFoundError:
        return False


def _remove_stale(dest: Path) -> None:
    """Delete the work folders of killed conversions to `dest` (one log line); an `.old-` folder is the
    previous output, kept while `dest` itself is missing (killed between the two renames of a swap)."""
    removed, kept = [], []
    for entry in sorted(dest.parent.iterdir()):
        match = _WORK_DIR.fullmatch(entry.name)
        if not match or match["name"] != dest.name or entry.is_symlink() or not entry.is_dir():
            continue
        if not _writer_gone(int(match["pid"]), entry):
            continue
        if match["kind"] == "old" and not os.path.lexists(dest):
            kept.append(str(entry))
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(str(entry))
    if removed:
        log.warning("removed %d stale work folder(s) of killed conversions to %s: %s",
                    len(removed), dest, ", ".join(removed))
    if kept:
        log.warning("kept %s: the previous output of %s, left by a conversion killed while replacing it "
                    "(rename it back if you want it)", ", ".join(kept), dest)


def _refuse_symlink(dest: Path) -> None:
    # Refused rather than resolved: replacing a link's target writes wherever the link points (maybe
    # someone else's folder, maybe another filesystem, where the final rename is not atomic), and
    # replacing the link itself would silently turn a shared `latest -> run-3` into a plain folder.
    if dest.is_symlink():
        raise ConversionError(f"{dest} is a symbolic link (to {os.readlink(dest)}); give the real folder "
                              "as the output")


@contextlib.contextmanager
def atomic_output_dir(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `dest` only when the body succeeds.

    Without `overwrite`, a `dest` that appeared meanwhile (another conversion finishing first) is never
    replaced: the final rename of a folder onto an existing non-empty folder, a file or a link fails
    (POSIX rename(2)), and this one reports it and removes its own work. With `overwrite`, the old
    output moves aside, the new one moves in right after, and the old one is deleted last."""
    dest = Path(dest).absolute()
    _refuse_symlink(dest)
    if dest.exists() and not overwrite:
        raise ConversionError(f"{dest} already exists (pass overwrite / --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest)
    # Unique per call (threads of one process too); the PID lets a later run judge it stale.
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become the output's
    try:
        yield tmp
        _move_in(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)


def _lost_race(dest: Path) -> ConversionError:
    return ConversionError(f"{dest} appeared while this conversion ran (another one finished first?); "
                           "its output is kept and this one is discarded")


def _move_in(tmp: Path, dest: Path, overwrite: bool) -> None:
    _refuse_symlink(dest)
    old = None
    if os.path.lexists(dest):
        if not overwrite:
            raise _lost_race(dest)
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)  # right after the old one moved aside: the name is empty for two syscalls
    except OSError as e:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, dest)  # put the previous output back (fails only if dest is taken again)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _lost_race(dest) from None
        raise ConversionError(f"could not move the new output into {dest}: {e}") from None
    if old is not None:  # deleted last, once the new output is in place
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _refuse_outside(src: Path, path: Path) -> None:
    """A tokenizer file must be a regular file inside `src` (links within it are fine, and so is a
    Hugging Face hub snapshot's link into its model's `blobs/`): a link to /etc/passwd would be
    copied into the checkpoint and published with it."""
    real, root = path.resolve(), src.resolve()
    allowed = [root]
    if src.absolute().parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev>/
        allowed.append(src.absolute().parent.parent.resolve() / "blobs")
    if not any(real.is_relative_to(a) for a in allowed):
        raise ConversionError(f"{path}: a symbolic link to {real}, outside the tokenizer folder {src}; "
                              "refusing to copy it (put the real file in the folder)")


def copy_tokenizer(src: Path | None, dest: Path, required: bool = False) -> list[str]:
    """Copy the tokenizer files found in `src` into `dest`; returns what was copied. With
    `required` (a folder the user named), a folder without any is an error."""
    if src is None:
        return []
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: tokenizer folder does not exist")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            _refuse_outside(src, src / name)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dest / name)
            copied.append(name)
    if required and not copied:
        raise ConversionError(f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return copied


def export_tokenizer(src: Path | None, dest: Path, *, required: bool, vocab_size: int,
                     eos_token_id: int | list[int] | None) -> list[str]:
    """The tokenizer of a Hugging Face export: `src`'s files when it has a loadable set (a
    tokenizer.json or tokenizer_config.json), else the converted offline Llama-3 tokenizer, so that
    AutoTokenizer always loads the export. Its eos_token follows the model's `eos_token_id`.
    A model whose vocabulary is smaller than Llama-3's gets none (logged)."""
    copied = copy_tokenizer(src, dest, required) if src is not None and (required or Path(src).is_dir()) else []
    if {"tokenizer.json", "tokenizer_config.json"} & set(copied):
        return copied
    from prolong_nemo.data import hf_tokenizer

    if vocab_size < hf_tokenizer.LLAMA3_VOCAB_SIZE:
        log.warning("no tokenizer in the export: none in the source, and the model's %d-token vocabulary is "
                    "smaller than the Llama-3 tokenizer's %d (pass a tokenizer folder)", vocab_size,
                    hf_tokenizer.LLAMA3_VOCAB_SIZE)
        return copied
    try:
        written = hf_tokenizer.write_llama3_tokenizer(dest, eos_token_id)
    except ImportError as err:
        log.warning("no tokenizer in the export: none in the source, and converting the Llama-3 tokenizer "
                    "needs transformers + tokenizers (%s)", err)
        return copied
    log.warning("no tokenizer files in the source: wrote the converted offline Llama-3 tokenizer (%s, eos_token "
                "%s) to the export", ", ".join(written), hf_tokenizer.eos_token_for(eos_token_id))
    return copied + written


def progress(total_bytes: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)
