"""The `prolong-nemo` command line: one entry point, one module per command group.

Each command group lives next to the code it drives and exposes
``configure_parser(parser)``, which adds its arguments (or sub-commands) to
the parser of `prolong-nemo <group>` and sets ``func`` (called with the parsed args).
Groups are imported lazily: `prolong-nemo --help` and `--version` import no group, and a
group's module is imported only when that group runs. A group with sub-commands can defer its
sub-commands the same way with `LazyParser` and `module_summary` (see `prolong_nemo.data.commands`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
import sys
import warnings
from functools import cache
from pathlib import Path
from typing import Callable

import prolong_nemo
from prolong_nemo.errors import UserError

# (command, module that registers it, one-line help)
COMMAND_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("data", "prolong_nemo.data.commands", "inspect, tokenize and pack ProLong MDS data"),
    ("train", "prolong_nemo.training.commands", "train a recipe (Megatron-Bridge on GPU, CPU runner otherwise)"),
    ("plan", "prolong_nemo.recipes.plan", "check a recipe's parallelism and estimate memory before launching"),
    ("launch", "prolong_nemo.recipes.launch", "submit a recipe through NeMo-Run (local or Slurm)"),
    ("convert", "prolong_nemo.convert.commands", "convert Llama-3 checkpoints between Hugging Face and Megatron"),
    ("demo", "prolong_nemo.demo", "end-to-end CPU demo: data, 64K-recipe training, SFT, conversion"),
)


def _module_file(module_name: str) -> Path:
    """The source file of a `prolong_nemo` module, found without importing it or its package.

    (`importlib.util.find_spec("prolong_nemo.convert.commands")` would import `prolong_nemo.convert`,
    whose `__init__` imports torch.)
    """
    top, *parts = module_name.split(".")
    if top != "prolong_nemo":
        raise ValueError(f"not a prolong_nemo module: {module_name}")
    return Path(prolong_nemo.__file__).parent.joinpath(*parts).with_suffix(".py")


@cache
def module_summary(module_name: str) -> str | None:
    """First line of a `prolong_nemo` module's docstring, read from its source without importing it;
    None when the module is not there (a sub-command whose code is not in this install)."""
    path = _module_file(module_name)
    if not path.is_file():
        return None
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class LazyParser(argparse.ArgumentParser):
    """A sub-command's parser that adds its arguments (``configure(parser)``) only when that
    sub-command is parsed, so `prolong-nemo <group> --help` imports none of the sub-commands' modules.

    Use as ``parser.add_subparsers(parser_class=LazyParser)`` and
    ``sub.add_parser(name, help=..., configure=...)``.
    """

    def __init__(self, *args, configure: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._configure = configure

    def parse_known_args(self, args=None, namespace=None):
        # argparse's sub-parsers action parses the chosen sub-command through this method.
        if self._configure is not None:
            configure, self._configure = self._configure, None
            configure(self)
        return super().parse_known_args(args, namespace)


def version_line() -> str:
    return f"prolong-nemo {prolong_nemo.__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prolong-nemo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name, help_text in COMMAND_GROUPS:
        if not _module_file(module_name).is_file():
            continue
        # Register lazily: the group's module is imported only when its command runs.
        group = sub.add_parser(name, help=help_text, add_help=False)
        group.set_defaults(_group_module=module_name, command=name)
    return parser


# Messages megatron-core / torch print on every run that say nothing about this run: optional
# backends (TE, Apex) being absent, and deprecations inside the libraries' own code.
_NOISY_WARNINGS = (".*(Transformer Engine|Apex|absl).*", ".*torch.distributed is disabled.*",
                   ".*argument order of load has been changed.*", ".*Please use DTensor instead.*",
                   ".*full scope is deprecated.*", ".*Could not determine rank.*")
_NOISY_LOGS = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
    "megatron.core.dist_checkpointing.strategies.torch": "async save is deprecated",
    "megatron.core.datasets.blended_dataset": "Cannot save the BlendedDataset indexes",
}


def quiet_known_noise() -> None:
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for name, text in _NOISY_LOGS.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())


def parse_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """`prolong-nemo <group> ...` parsed by that group's parser (importing only that group's
    module); ``args.func(args)`` runs it. Exits as argparse does on bad arguments or --help."""
    top, _ = (parser or build_parser()).parse_known_args(argv[:1])
    module = importlib.import_module(top._group_module)
    group_parser = argparse.ArgumentParser(prog=f"prolong-nemo {top.command}")
    module.configure_parser(group_parser)
    # Options may follow positionals (`plan stage_64k --json parallel.cp=2`); argparse only
    # supports that for parsers without sub-commands.
    parse = group_parser.parse_args if group_parser._subparsers else group_parser.parse_intermixed_args
    return parse(argv[1:])


def main(argv: list[str] | None = None) -> int:
    quiet_known_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        print(version_line())
        return 0
    args = parse_args(argv, parser)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError) as e:  # bad input or paths: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
