"""`fastkd info`: versions, the compiled extension and each backend's state; with
``--check``, every available backend of every op run against the reference on each
device (see fastkd.selfcheck)."""
import platform


def _versions() -> list[tuple[str, str]]:
    import torch

    import fastkd

    rows = [("fastkd", fastkd.__version__), ("python", platform.python_version())]
    cuda = torch.version.cuda
    rows.append(("torch", f"{torch.__version__} ({f'CUDA {cuda}' if cuda else 'CPU-only build'})"))
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        rows.append(("triton", f"not importable ({type(e).__name__})"))
    if torch.cuda.is_available():
        devs = []
        for i in range(torch.cuda.device_count()):
            a, b = torch.cuda.get_device_capability(i)
            devs.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{a}{b})")
        rows.append(("GPUs", "; ".join(devs)))
    else:
        rows.append(("GPUs", "none visible"))
    return rows


def _extension_rows() -> list[tuple[str, str]]:
    from fastkd import _backend as B

    state = B.extension_state()
    if state != "ok":
        return [("fastkd._C", f"{state}: {B.backend_status('cpp').reason}")]
    info = B.extension_info()
    archs = info.get("cuda_archs") or ""
    return [("fastkd._C", f"ok, built for torch {info.get('torch_version')}"
             f"{', OpenMP' if info.get('openmp') else ''}"),
            ("CUDA kernels", f"compiled for {archs}" if info.get("with_cuda")
             else f"not compiled: {info.get('no_cuda_reason') or 'unknown reason'}")]


def _run(args) -> int:
    import fastkd

    rows = _versions() + _extension_rows()
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("backends:")
    for name, st in fastkd.backends().items():
        print(f"  {name:<7} {'available' if st.available else 'unavailable':<12} {st.reason}")
    if args.check:
        from fastkd import selfcheck

        return selfcheck.main()
    return 0


def register(sub) -> None:
    s = sub.add_parser("info", help="show versions, the compiled kernels and which backends can run here",
                       description="Show versions, the compiled kernels and which backends can run here. "
                                   "--check also runs every available backend of every op against the "
                                   "plain-PyTorch reference on each device present and prints a pass/fail "
                                   "table (exit status 1 if any check fails).")
    s.add_argument("--check", action="store_true",
                   help="run every available backend of every op against the reference on small inputs "
                        "(Triton on the CPU under TRITON_INTERPRET=1)")
    s.set_defaults(func=_run)
