"""`opt-ds` entry point. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so `opt-ds --help` is instant.

Subcommands outside the opt_ds package (the checkpoint converter) register themselves through the
`opt_ds.commands` entry-point group in setup.cfg, so nothing in opt_ds imports them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

BUILTIN_COMMANDS = {
    "train": ("opt_ds.train.cli", "train an OPT model from a YAML config"),
    "bench": ("opt_ds.bench.cli", "measure training throughput (TFLOP/s, MFU, energy) beside peers; project large runs"),
}


def _commands() -> dict:
    commands = dict(BUILTIN_COMMANDS)
    for ep in entry_points(group="opt_ds.commands"):
        commands.setdefault(ep.name, (ep.value, f"see `opt-ds {ep.name} --help`"))
    return commands


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    parser = argparse.ArgumentParser(prog="opt-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in commands:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(commands[name][0])
    command_parser = argparse.ArgumentParser(prog=f"opt-ds {name}", description=module.__doc__)
    module.add_arguments(command_parser)
    return module.run(command_parser.parse_args(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
