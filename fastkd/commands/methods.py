"""`fastkd distill` and `fastkd demo`: dispatch to a method module.

Each method lives in ``fastkd.methods.<name>`` and defines ``METHOD = "<name>"`` (or a
list ``METHODS``), ``cli_distill(argv) -> int`` and ``cli_demo(argv) -> int``, parsing
its own options, so methods are added without touching this file.
"""
import argparse
import importlib
import pkgutil


def available_methods() -> dict[str, str]:
    """method name -> module name, discovered in fastkd.methods."""
    import fastkd.methods as pkg

    out = {}
    for m in sorted(x.name for x in pkgutil.iter_modules(pkg.__path__)):
        if m.startswith("_"):
            continue
        mod = importlib.import_module(f"fastkd.methods.{m}")
        for name in getattr(mod, "METHODS", [getattr(mod, "METHOD", None)]):
            if name:
                out[name] = m
    return out


def _dispatch(kind: str, args) -> int:
    methods = available_methods()
    if args.method not in methods:
        raise SystemExit(f"fastkd {kind}: unknown --method {args.method!r}; available: "
                         f"{', '.join(methods) or 'none'}")
    mod = importlib.import_module(f"fastkd.methods.{methods[args.method]}")
    fn = getattr(mod, f"cli_{kind}")
    return fn(["--method", args.method] + list(args.rest))


def register(sub) -> None:
    for kind, help_ in (("distill", "distill a student from a teacher (run with --method M --help)"),
                        ("demo", "run a method end to end on the bundled digits default")):
        s = sub.add_parser(kind, help=help_, add_help=False,
                           description=f"fastkd {kind} --method METHOD [options]; "
                                       f"`fastkd {kind} --method METHOD --help` lists the options.")
        s.add_argument("--method", default="cake" if kind == "demo" else None, required=kind != "demo")
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=lambda a, kind=kind: _dispatch(kind, a))
