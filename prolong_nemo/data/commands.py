"""`prolong-nemo data ...`: inspect, tokenize and pack ProLong MDS data."""

from __future__ import annotations

import argparse
import importlib

# sub-command -> module exposing configure_parser(parser) (sets `func`)
SUBCOMMANDS = {
    "inspect": "prolong_nemo.data.inspect",
    "tokenize": "prolong_nemo.data.tokenize",
    "pack": "prolong_nemo.data.packer",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        module.configure_parser(sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))
