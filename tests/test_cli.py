"""`prolong-nemo --help`, `--version` and each group's `--help` stay light: they import no torch,
megatron or numpy (importing torch alone took ~3 s of the 3.4 s `--help` used to take)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from prolong_nemo.cli import LazyParser, main, module_summary

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron", "numpy", "streaming", "transformers", "hydra", "omegaconf", "nemo_run")

# Runs the CLI in a fresh interpreter, then reports which heavy top-level packages got imported.
PROBE = """
import contextlib, io, json, sys
from prolong_nemo.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:  # argparse's --help of a group exits
        code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"code": code, "stdout": out.getvalue(), "heavy": heavy}))
"""


def run_probe(*argv: str) -> dict:
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_help_imports_nothing_heavy_and_lists_every_group():
    result = run_probe("--help")
    assert result["code"] == 0
    assert result["heavy"] == []
    for group in ("data", "train", "plan", "launch", "convert", "demo"):
        assert group in result["stdout"]
    assert "--version" in result["stdout"]


def test_version_is_the_installed_distributions():
    expected = metadata.version("prolong-nemo")
    result = run_probe("--version")
    assert result == {"code": 0, "stdout": f"prolong-nemo {expected}\n", "heavy": []}
    # pyproject.toml is the one place the version is written
    assert f'version = "{expected}"' in (ROOT / "pyproject.toml").read_text()
    import prolong_nemo

    assert prolong_nemo.__version__ == expected


@pytest.mark.parametrize("group", ["data", "train", "plan", "launch", "convert", "demo"])
def test_group_help_imports_no_torch_or_megatron(group):
    result = run_probe(group, "--help")
    assert result["code"] == 0
    assert f"usage: prolong-nemo {group}" in result["stdout"]
    assert "torch" not in result["heavy"] and "megatron" not in result["heavy"]


def test_data_help_lists_subcommands_from_their_docstrings_without_importing_them():
    result = run_probe("data", "--help")
    assert result["heavy"] == []
    import prolong_nemo.data.inspect as inspect_module

    first_line = inspect_module.__doc__.strip().splitlines()[0]
    assert module_summary("prolong_nemo.data.inspect") == first_line
    # argparse re-wraps the help text: compare words
    assert " ".join(first_line.split()[:6]) in " ".join(result["stdout"].split())
    for name in ("inspect", "tokenize", "pack"):
        assert name in result["stdout"]


def test_data_subcommand_still_parses_its_own_arguments(capsys):
    # a sub-command's arguments are added when it is chosen: its --help shows them
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "inspect", "--help"])
    assert exit_info.value.code == 0
    assert "--cp-size" in capsys.readouterr().out


def test_module_summary_of_a_missing_module_is_none():
    assert module_summary("prolong_nemo.data.no_such_module") is None
    with pytest.raises(ValueError, match="not a prolong_nemo module"):
        module_summary("json.decoder")


def test_lazy_parser_configures_only_the_chosen_subcommand():
    configured = []

    def configure(name):
        def add(p: argparse.ArgumentParser) -> None:
            configured.append(name)
            p.add_argument("--size", type=int, default=3)
        return add

    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=LazyParser)
    sub.add_parser("a", help="first", configure=configure("a"))
    sub.add_parser("b", help="second", configure=configure("b"))
    assert configured == []
    args = parser.parse_args(["b", "--size", "7"])
    assert (args.cmd, args.size, configured) == ("b", 7, ["b"])
    assert parser.parse_args(["b"]).size == 3 and configured == ["b"]  # configured once


def test_train_flag_defaults_are_train_configs():
    from prolong_nemo.training import commands
    from prolong_nemo.training.cpu.runner import TrainConfig

    parser = argparse.ArgumentParser()
    commands.configure_parser(parser)
    assert commands.config_from_args(parser.parse_args([])) == TrainConfig()
    cfg = commands.config_from_args(parser.parse_args(["--lr", "0.5", "--seq-length", "128", "--cp", "2"]))
    assert (cfg.lr, cfg.seq_length, cfg.cp, cfg.train_iters) == (0.5, 128, 2, TrainConfig().train_iters)


def test_help_is_fast():
    # The robust checks are the import ones above; this is a loose second check (the best of
    # three runs, against the ~3.4 s it took when --help imported torch).
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prolong_nemo.cli", "--help"], cwd=ROOT, check=True,
                       capture_output=True, timeout=120)
        best = min(best, time.perf_counter() - start)
    assert best < 1.5


def test_convert_dtype_choices_are_the_export_dtypes():
    from prolong_nemo.convert.commands import EXPORT_DTYPE_CHOICES
    from prolong_nemo.convert.hf_config import EXPORT_DTYPES

    assert EXPORT_DTYPE_CHOICES == ("auto", *EXPORT_DTYPES)
