"""`fastkd info`: what is available here."""


def _run(args) -> int:
    import torch

    import fastkd
    from fastkd import _backend as B

    print(f"fastkd {fastkd.__version__}, torch {torch.__version__}")
    if B.has_extension():
        print(f"fastkd._C: {B.extension_info()}")
    for name, st in fastkd.backends().items():
        print(f"  {name:<7} {'available' if st.available else 'unavailable':<12} {st.reason}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("info", help="show which kernel backends are available and why not")
    s.set_defaults(func=_run)
