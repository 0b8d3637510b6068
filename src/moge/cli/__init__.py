"""The ``moge`` command line: one module of this package per subcommand, imported only when it runs.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int | None``; its docstring's
first line is the command's help. Errors of bad input (:class:`moge.MoGEError`, missing files) print
one line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import MoGEError


# command -> module; each module is imported only when its command runs.
COMMANDS: dict[str, str] = {
    "demo": "moge.cli.demo",
    "train": "moge.cli.train",
    "generate": "moge.cli.generate",
    "convert": "moge.cli.convert",
    "quantize": "moge.cli.quantize",
    "info": "moge.cli.info",
    "route": "moge.cli.route",
    "simulate": "moge.cli.simulate",
    "analyze": "moge.cli.analyze",
    "serve": "moge.cli.serve",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moge", description="Mixture-of-Grouped-Experts language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see moge {name} --help)", add_help=False)
            continue
        mod = importlib.import_module(modname)
        doc = (mod.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module: keeps `moge simulate` free of model imports.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except (MoGEError, FileNotFoundError, NotADirectoryError) as e:
        print(f"moge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
