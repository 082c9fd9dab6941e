"""`fastkd distill` and `fastkd demo`: dispatch to a method module.

Each method lives in ``fastkd.methods.<name>`` and defines ``METHOD = "<name>"`` (or a
list ``METHODS``), a ``Config`` dataclass and ``run(...)`` (the method contract: the shared
command line of :func:`fastkd.methods._cli.distill_cli` serves it), or its own
``cli_distill(argv) -> int``; ``cli_demo(argv) -> int`` when it has a demo. Methods are
added without touching this file.
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


def _split_method(rest: list, default):
    """Take ``--method M`` / ``--method=M`` out of the pass-through arguments."""
    rest = list(rest)
    for i, a in enumerate(rest):
        if a == "--method" and i + 1 < len(rest):
            return rest[i + 1], rest[:i] + rest[i + 2:]
        if a.startswith("--method="):
            return a.split("=", 1)[1], rest[:i] + rest[i + 1:]
    return default, rest


def _dispatch(kind: str, args) -> int:
    methods = available_methods()
    method, rest = _split_method(args.rest, "cake" if kind == "demo" else None)
    if method is None:
        if any(a in ("-h", "--help") for a in rest):
            print(f"usage: fastkd {kind} --method METHOD [options]\n\n`fastkd {kind} --method METHOD --help` "
                  f"lists a method's options. Methods: {', '.join(methods) or 'none'}")
            return 0
        raise SystemExit(f"fastkd {kind}: --method is required; available: {', '.join(methods) or 'none'}")
    if method not in methods:
        raise SystemExit(f"fastkd {kind}: unknown --method {method!r}; available: "
                         f"{', '.join(methods) or 'none'}")
    mod = importlib.import_module(f"fastkd.methods.{methods[method]}")
    fn = getattr(mod, f"cli_{kind}", None)
    if fn is None and kind == "distill" and hasattr(mod, "run") and hasattr(mod, "Config"):
        from fastkd.methods._cli import distill_cli  # the shared command line of the method contract

        return distill_cli(mod, ["--method", method] + rest)
    if fn is None:
        raise SystemExit(f"fastkd {kind}: method {method!r} has no {kind}")
    return fn(["--method", method] + rest)


def register(sub) -> None:
    for kind, help_ in (("distill", "distill a student from a teacher (run with --method M --help)"),
                        ("demo", "run a method end to end on a bundled default (digits, or --data fmnist)")):
        # Every argument (options included) passes through to the method's own parser;
        # prefix_chars without "-" keeps argparse from claiming them here.
        s = sub.add_parser(kind, help=help_, add_help=False, prefix_chars="\x00",
                           description=f"fastkd {kind} --method METHOD [options]; "
                                       f"`fastkd {kind} --method METHOD --help` lists the options.")
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=lambda a, kind=kind: _dispatch(kind, a))
