"""The ``lca`` command: a thin dispatcher over ``replay.commands.*`` and ``analysis.commands``.

Each command module exposes ``register(subparsers)``, which adds its sub-command(s) and sets
``func`` on the parser to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from replay import __version__
from replay.errors import LCAError

# Modules that may be absent while the project grows are skipped, not fatal.
COMMAND_MODULES = (
    "replay.commands.store",      # info, verify
    "replay.commands.train",      # train
    "replay.commands.demo",       # demo
    "replay.commands.paper",      # paper
    "replay.commands.replay",     # replay
    "replay.commands.submit",    # submit, status
    "analysis.commands",          # report, export
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lca", description="Loss Change Allocation by offline checkpoint replay."
    )
    parser.add_argument("--version", action="version", version=f"lca-replay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LCAError as err:
        print(f"lca {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lca {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
