"""All-or-nothing output folders, tokenizer files and progress bars for the converters."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from prolong_nemo.convert.mapping import ConversionError

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


@contextlib.contextmanager
def atomic_output_dir(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `dest` only when the body succeeds."""
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise ConversionError(f"{dest} already exists (pass overwrite / --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
        shutil.rmtree(old)
    tmp.rename(dest)
    _fsync_dir(dest.parent)


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
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dest / name)
            copied.append(name)
    if required and not copied:
        raise ConversionError(f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return copied


def progress(total_bytes: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)
