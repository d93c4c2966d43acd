"""`prolong-nemo data ...`: inspect, tokenize and pack ProLong MDS data."""

from __future__ import annotations

import argparse
import importlib

# sub-command -> module exposing configure_parser(parser) (sets `func`)
SUBCOMMANDS = {
    "inspect": "prolong_nemo.data.inspect",
    "tokenize": "prolong_nemo.data.tokenize",
    "pack": "prolong_nemo.data.packer",
    "hf-tokenizer": "prolong_nemo.data.hf_tokenizer",
}
WRITERS = ("tokenize", "pack")  # sub-commands with inputs, -o/--output and --overwrite


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.configure_parser(p)
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
