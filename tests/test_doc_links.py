"""The repository's docs stand alone: every `*.md` file a tracked file names is in the repository
(or is a public URL, or a file the code writes)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MD_NAME = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")
URL = re.compile(r"https?://[^\s)>\]\"'`]+")
# Files the code writes, not docs it cites: the demo's report (prolong_nemo/demo.py).
WRITTEN = {"report.md", "runs/demo/report.md"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg"}


def tracked_files() -> list[Path]:
    try:
        # tracked files and new ones not yet committed (not the ignored: .venv, runs/, ...)
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sorted({ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()})


def dangling_md_names(path: Path, text: str, repo_paths: set[str], repo_names: set[str]) -> list[str]:
    """`file:line: name` for every `*.md` name in `text` that is not a file of the repository,
    relative to the root or to `path`'s folder, nor (given without a folder) any file's name, nor
    the end of a URL in the same text (a public doc cited by name and address)."""
    here = path.parent.relative_to(ROOT)
    urls = [url.rstrip(".,;:") for url in URL.findall(text)]
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in MD_NAME.findall(URL.sub(" ", line)):
            clean = name.lstrip("./")
            if (clean in WRITTEN or clean in repo_paths or (here / clean).as_posix() in repo_paths
                    or ("/" not in clean and clean in repo_names)
                    or any(url.endswith("/" + clean) for url in urls)):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    return bad


def test_the_checker_flags_a_missing_doc_and_accepts_real_ones():
    repo_paths = {"README.md", "docs/batch-contract.md", "recipes/README.md"}
    repo_names = {Path(p).name for p in repo_paths}
    path = ROOT / "docs" / "x.md"
    text = ("see docs/batch-contract.md and README.md\n"
            "relative: batch-contract.md; elsewhere: https://github.com/o/r/blob/main/docs/perf.md\n"
            "(docs/perf.md,\n https://github.com/o/r/blob/main/docs/perf.md; and so on)\n"
            "gone: docs/missing-notes.md and other-notes.md\n")
    assert dangling_md_names(path, text, repo_paths, repo_names) == [
        "docs/x.md:5: docs/missing-notes.md", "docs/x.md:5: other-notes.md"]


def test_every_cited_md_file_is_in_the_repository():
    files = tracked_files()
    repo_paths = {p.relative_to(ROOT).as_posix() for p in files}
    repo_names = {p.name for p in files}
    bad = []
    for path in files:
        if path.suffix not in TEXT_SUFFIXES and path.name != "Dockerfile" or path == Path(__file__).resolve():
            continue  # (this file names missing docs on purpose, in the checker's own test)
        bad += dangling_md_names(path, path.read_text(encoding="utf-8", errors="replace"), repo_paths, repo_names)
    assert bad == []
