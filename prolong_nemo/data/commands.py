"""`prolong-nemo data ...`: inspect, tokenize and pack ProLong MDS data."""

from __future__ import annotations

import argparse
import importlib
from functools import partial

from prolong_nemo.cli import LazyParser, module_summary

# sub-command -> module exposing configure_parser(parser) (sets `func`)
SUBCOMMANDS = {
    "inspect": "prolong_nemo.data.inspect",
    "tokenize": "prolong_nemo.data.tokenize",
    "pack": "prolong_nemo.data.packer",
    "hf-tokenizer": "prolong_nemo.data.hf_tokenizer",
}
WRITERS = ("tokenize", "pack")  # sub-commands with inputs, -o/--output and --overwrite


def configure_parser(parser: argparse.ArgumentParser) -> None:
    # A sub-command's module (numpy, streaming, tokenizers) is imported only when it is chosen:
    # `data --help` lists the sub-commands from their docstrings, read without importing them.
    sub = parser.add_subparsers(dest="data_command", required=True, parser_class=LazyParser)
    for name, module_name in SUBCOMMANDS.items():
        summary = module_summary(module_name)
        if summary is None:
            continue
        sub.add_parser(name, help=summary, configure=partial(_configure_subcommand, name, module_name))


def _configure_subcommand(name: str, module_name: str, p: argparse.ArgumentParser) -> None:
    importlib.import_module(module_name).configure_parser(p)
    if name in WRITERS:
        p.set_defaults(func=_refusing_overlap(p.get_default("func")))


def _refusing_overlap(func):
    """`--overwrite` deletes the output folder first: refuse one that is, holds or lies inside an input."""
    def run(args: argparse.Namespace) -> int:
        if args.overwrite:
            from prolong_nemo.convert.outputs import refuse_overlap
            from prolong_nemo.errors import UserError

            refuse_overlap(args.output, args.inputs, error=UserError)
        return func(args)
    return run
