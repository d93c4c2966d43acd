"""docs/walkthrough.md: every `prolong-nemo` command in it parses with the real CLI, its recipe
overrides compose into valid recipes, and its data mixtures are the recipes' own."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from prolong_nemo.cli import parse_args

DOC = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"


def doc_commands(text: str) -> list[list[str]]:
    """The shell commands of the Markdown's indented code blocks, `\\` continuations joined."""
    commands, current = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            current = ""
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
        else:
            commands.append(shlex.split(current))
            current = ""
    return commands


def cli_commands() -> list[list[str]]:
    return [cmd[1:] for cmd in doc_commands(DOC.read_text()) if cmd[0] == "prolong-nemo"]


def test_the_extractor_joins_continuations():
    text = "prose\n\n    prolong-nemo plan stage_64k \\\n        'a=[x:y]' b=1\n    echo hi\nmore prose\n"
    assert doc_commands(text) == [["prolong-nemo", "plan", "stage_64k", "a=[x:y]", "b=1"], ["echo", "hi"]]


def test_the_walkthrough_covers_the_run_from_data_to_verified_export():
    steps = [" ".join(cmd[:2]) for cmd in cli_commands()]
    for step in ("convert hf-to-megatron", "convert verify", "data inspect", "plan stage_64k",
                 "launch stage_64k", "launch stage_512k", "launch sft", "launch pipeline",
                 "convert megatron-to-hf"):
        assert step in steps
    downloads = {cmd[2] for cmd in doc_commands(DOC.read_text()) if cmd[:2] == ["hf", "download"]}
    assert downloads == {"princeton-nlp/prolong-data-64K", "princeton-nlp/prolong-data-512K",
                         "princeton-nlp/prolong-ultrachat-64K", "meta-llama/Meta-Llama-3-8B-Instruct"}


@pytest.mark.parametrize("argv", cli_commands(), ids=lambda argv: " ".join(argv[:2]))
def test_every_command_parses(argv):
    args = parse_args(argv)
    assert callable(args.func)
    if argv[0] in ("plan", "launch", "train"):  # the overrides name real recipe keys and values
        from prolong_nemo.recipes.pipeline import split_overrides
        from prolong_nemo.recipes.stages import load_recipe

        if args.recipe == "pipeline":  # each stage: the common overrides, then its own
            common, own = split_overrides(args.overrides)
            runs = {stage: [*common, *own[stage]] for stage in own}
            assert args.runs_dir == "/lustre/prolong/runs"
        else:
            runs = {args.recipe: args.overrides}
            assert f"checkpoint.dir=/lustre/prolong/runs/{args.recipe}/checkpoints" in args.overrides
        for name, overrides in runs.items():
            assert load_recipe(name, overrides).data.root.startswith("/lustre/prolong/data")


def test_inspected_mixtures_are_the_recipes():
    from prolong_nemo.recipes.stages import load_recipe

    by_root = {}
    for name in ("stage_64k", "stage_512k"):
        data = load_recipe(name).data
        by_root[Path(data.root).name] = {d.path: d.proportion for d in data.mixture}
    inspected = [parse_args(argv) for argv in cli_commands() if argv[:2] == ["data", "inspect"] and "--root" in argv]
    assert len(inspected) == 2
    for args in inspected:
        mixture = {t.split("=")[0]: float(t.split("=")[1]) for t in args.targets}
        assert mixture == by_root[Path(args.root).name]
