"""Every `prolong-nemo ...` command the READMEs show in a code block runs as written.

Commands are taken from fenced (```) and indented (4 spaces) code blocks of README.md and
recipes/README.md, `\\` continuations joined, `# comments` kept as the documented outcome. Each
runs in a fresh folder with NeMo-Run importable, no PROLONG_* variable set, and gets the
treatment `treatment()` gives its command; a command without one fails the test:

- plan: as written (it executes nothing);
- launch: as written plus `--dry-run` (NeMo-Run builds the jobs and prints them, submits nothing);
- train: as written plus `--cfg job` (prints the composed recipe and the Megatron-Bridge
  ConfigContainer it builds; nothing is trained);
- demo, data <cmd>, convert <cmd>: `--help` of that command (they need real data or run for
  minutes; tests/test_demo.py, test_data_*.py and test_convert*.py run them on fixtures).

A command documented with a `# refused ...` comment must exit 1 and print REFUSED; every other
command must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "recipes/README.md")
NEMO_RUN_SITE = Path(os.environ.get("PROLONG_NEMO_RUN_SITE", REPO / ".venv" / "extras" / "nemo-run"))
SEPARATORS = ("&&", "||", ";", "|")


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    argv: tuple[str, ...]  # after `prolong-nemo`
    comment: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{' '.join(self.argv[:2])}"


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the fenced and indented code blocks, continuations joined."""
    out: list[tuple[int, str]] = []
    fenced, indented, prev_blank = False, False, True
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or (line.startswith("    ") and (indented or prev_blank)):
            indented = not fenced
            out.append((number, line.strip()))
        elif line.strip():
            indented = False
        prev_blank = not line.strip()
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in out:
        if pending:
            number, line = pending[0], pending[1] + " " + line
        pending = (number, line[:-1].rstrip()) if line.endswith("\\") else None
        if not pending:
            joined.append((number, line))
    return joined


def doc_commands(doc: str) -> list[DocCommand]:
    commands = []
    for number, line in code_lines((REPO / doc).read_text()):
        match = re.search(r"(^|\s)#\s", line)  # a shell comment: the documented outcome
        code, comment = (line[:match.start()], line[match.end():]) if match else (line, "")
        tokens = shlex.split(code)
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            if segment and os.path.basename(segment[0]) == "prolong-nemo":
                commands.append(DocCommand(doc, number, tuple(segment[1:]), comment.strip()))
            segment = []
    return commands


ALL = [c for doc in DOCS for c in doc_commands(doc)]


def treatment(command: DocCommand) -> tuple[str, list[str]]:
    """(name, the argv that runs) for a documented command; fails for an uncovered one."""
    argv = list(command.argv)
    group = argv[0] if argv else ""
    if group == "plan":
        return "as written", argv
    if group == "launch":
        return "dry run", argv if "--dry-run" in argv else [*argv, "--dry-run"]
    if group == "train":
        return "--cfg job", argv if "--cfg" in argv else [*argv, "--cfg", "job"]
    if group == "demo":
        return "--help", ["demo", "--help"]
    if group in ("data", "convert") and len(argv) > 1:
        return "--help", [group, argv[1], "--help"]
    pytest.fail(f"{command.id}: no treatment for `prolong-nemo {' '.join(argv)}`; add one to treatment()")


def test_the_docs_show_the_commands_this_test_covers():
    """The extraction finds the commands (a broken parser would pass every other test)."""
    shown = {(c.doc, c.argv[0], c.argv[1] if len(c.argv) > 1 else "") for c in ALL}
    assert ("README.md", "demo", "") in shown
    assert {("recipes/README.md", "plan", "stage_512k"), ("recipes/README.md", "train", "stage_64k"),
            ("recipes/README.md", "launch", "pipeline")} <= shown
    assert any(c.argv[0] == "launch" and "--executor" in c.argv and "slurm" in c.argv and c.argv[1] != "pipeline"
               for c in ALL)
    # continuations are joined: the Slurm example's last line is part of its command
    [slurm] = [c for c in ALL if c.doc == "recipes/README.md" and c.argv[:3] == ("launch", "--executor", "slurm")]
    assert any(a.startswith("checkpoint.dir=/") for a in slurm.argv)


def test_code_lines_join_continuations_and_skip_prose():
    text = "text\n\n    prolong-nemo plan a \\\n        b=1   # refused: x\n\nprose prolong-nemo plan c\n\n```\nx && prolong-nemo demo\n```\n"
    assert code_lines(text) == [(3, "prolong-nemo plan a b=1   # refused: x"), (9, "x && prolong-nemo demo")]


@pytest.mark.parametrize("command", ALL, ids=[c.id for c in ALL])
def test_doc_command_runs(command, tmp_path):
    name, argv = treatment(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROLONG_")}
    if (NEMO_RUN_SITE / "nemo_run").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NEMO_RUN_SITE), env.get("PYTHONPATH")]))
    elif argv[0] == "launch":
        pytest.skip("NeMo-Run not installed (recipes/requirements-launch.txt)")
    proc = subprocess.run([sys.executable, "-m", "prolong_nemo.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if command.comment.startswith("refused"):
        assert proc.returncode == 1 and "REFUSED" in output, f"{command.id} ({name}):\n{output[-3000:]}"
    else:
        assert proc.returncode == 0, f"{command.id} ({name}): exit {proc.returncode}\n{output[-3000:]}"
    if name == "dry run":
        assert "job " in proc.stdout and "command:" in proc.stdout  # what runs where was printed
    if name == "--cfg job":
        assert proc.stdout.startswith(f"# recipe {argv[1]}, composed and resolved")
    assert not any(tmp_path.iterdir()), f"{command.id} ({name}) wrote {sorted(tmp_path.iterdir())}"
