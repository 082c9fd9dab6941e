"""The ``fastkd`` command line. Sub-commands are discovered in :mod:`fastkd.commands`."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    import fastkd.commands as pkg

    p = argparse.ArgumentParser(
        prog="fastkd",
        description="Fast knowledge distillation without the teacher's data.",
        epilog="Run `fastkd COMMAND --help` for the options of a command.")
    from fastkd import __version__

    p.add_argument("--version", action="version", version=f"fastkd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"fastkd.commands.{name}").register(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
