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
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"fastkd.commands.{name}").register(sub)
    return p


def _method_argv(argv):
    """(method, remaining args in order) of ``distill`` / ``demo`` arguments."""
    method, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if method is None and a == "--method" and i + 1 < len(argv):
            method, i = argv[i + 1], i + 2
            continue
        if method is None and a.startswith("--method="):
            method, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    return method, rest


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("distill", "demo"):
        # Method options are parsed by the method itself, in any order around --method.
        method, rest = _method_argv(argv[1:])
        if method is None and argv[0] == "demo" and not {"-h", "--help"} & set(rest):
            method = "cake"
        if method is not None:
            from .commands.methods import _dispatch

            return int(_dispatch(argv[0], argparse.Namespace(method=method, rest=rest)) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
