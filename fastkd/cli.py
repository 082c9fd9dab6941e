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
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"fastkd.commands.{name}").register(sub)
    return p


#: Errors that mean the input cannot work (exit status 2) and errors that stop a run that
#: would otherwise report success on garbage (exit status 1): printed as one line, the
#: traceback only with --debug.
_INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 PermissionError)


def _run_errors() -> tuple:
    from fastkd.distill import StudentCollapsedError
    from fastkd.synthesis import ShardMismatchError

    errs = [FloatingPointError, StudentCollapsedError, ShardMismatchError]
    try:
        from fastkd.blackbox import BlackBoxError

        errs.append(BlackBoxError)
    except ImportError:  # pragma: no cover - the client is part of the package
        pass
    return tuple(errs)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from fastkd import _run

    _run.COMMAND = list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fastkd: interrupted; what was written is kept, and the same command resumes where it can",
              file=sys.stderr)
        return 130
    except _INPUT_ERRORS as e:
        from fastkd._run import UsageError

        print(f"fastkd: error: {_one_line(e, debug_hint=not isinstance(e, UsageError))}", file=sys.stderr)
        return 2
    except Exception as e:
        if isinstance(e, _run_errors()):
            print(f"fastkd: error: {_one_line(e)}", file=sys.stderr)
            return 1
        raise


def _one_line(e: BaseException, debug_hint: bool = True) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg + (" (--debug shows the traceback)" if debug_hint else "")


if __name__ == "__main__":
    sys.exit(main())
