"""The `opt-ds` command. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so `opt-ds --help` is instant.

Subcommands outside the opt_ds package (the checkpoint converter) register themselves through the
`opt_ds.commands` entry-point group in setup.cfg, so nothing in opt_ds imports them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import entry_points

import opt_ds
from opt_ds import quiet
from opt_ds.errors import UserError

BUILTIN_COMMANDS = {
    "train": ("opt_ds.train.cli", "train an OPT model from a YAML config"),
    "generate": ("opt_ds.train.generate_cli", "sample text from a training checkpoint"),
    "eval": ("opt_ds.eval.cli", "evaluate a checkpoint: lm-evaluation-harness tasks, perplexity"),
    "summary": ("opt_ds.train.summary", "summarise a run's metrics.jsonl (validation loss, speed, sample)"),
    "launch": ("opt_ds.launch", "check a hostfile against a config, then start `deepspeed --hostfile ... train`"),
    "preprocess": ("opt_ds.data.cli", "tokenize text/JSONL into a megatron .bin/.idx dataset (dedup, resumable)"),
    "bench": ("opt_ds.bench.cli", "measure training throughput (TFLOP/s, MFU, energy) beside peers; project large runs"),
    "plan": ("opt_ds.bench.plan", "list the layouts of a model on N GPUs that fit in memory, fastest first"),
}


def _commands() -> dict:
    commands = dict(BUILTIN_COMMANDS)
    for ep in entry_points(group="opt_ds.commands"):
        if ep.name not in commands:     # a plugin module states its one-line help as HELP (keep it light)
            help_text = getattr(importlib.import_module(ep.value), "HELP", f"see `opt-ds {ep.name} --help`")
            commands[ep.name] = (ep.value, help_text)
    return commands


def _strip_local_rank(argv: list) -> list:
    """DeepSpeed's launcher passes `--local_rank=N` first; the rank is also in the LOCAL_RANK variable."""
    kept = []
    for arg in argv:
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            kept.append(arg)
    return kept


DESCRIPTION = """Pre-train OPT-family language models with 3D parallelism: DeepSpeed pipeline stages x
megatron-core tensor parallelism x ZeRO-1 data parallelism."""

EPILOG = """a first run:
  opt-ds preprocess --bundled-corpus --output-prefix runs/mine/data/shakespeare --vocab-size 8192
  opt-ds train ds_configs/demo.yaml parallel.tensor=1 parallel.pipeline=1 train.steps=50 \\
      data.train='[{path: runs/mine/data/shakespeare}]' train.save_dir=runs/mine/checkpoints train.log_dir=runs/mine
  opt-ds summary runs/mine

`opt-ds COMMAND --help` describes each command; every command takes --verbose (show third-party warnings)."""


def _top_parser(commands: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opt-ds", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"opt-ds {opt_ds.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    commands = _commands()
    if not argv or argv[0] not in commands:
        parser = _top_parser(commands)
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)                 # --help, --version, or an unknown command: argparse exits
        return 2
    name = argv[0]
    verbose = "--verbose" in argv[1:] or os.environ.get(quiet.VERBOSE_ENV) == "1"
    quiet.install(verbose)                      # before the command's module imports torch, deepspeed, megatron
    module = importlib.import_module(commands[name][0])
    command_parser = argparse.ArgumentParser(prog=f"opt-ds {name}", description=module.__doc__)
    module.add_arguments(command_parser)
    command_parser.add_argument("--verbose", action="store_true",
                                help="show every third-party warning and log line (default: the known-harmless "
                                     "start-up ones are filtered, see opt_ds/quiet.py)")
    args = command_parser.parse_intermixed_args(argv[1:])
    from opt_ds.parallel.layout import shutdown_distributed
    try:
        status = module.run(args)
    except UserError as err:
        shutdown_distributed(wait=False)
        print(f"opt-ds {name}: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    shutdown_distributed()
    return status


if __name__ == "__main__":
    sys.exit(main())
