"""`fastkd bench`: kernel microbenchmarks."""


def _run(args) -> int:
    import torch

    from fastkd.bench import registered_ops, run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = args.ops or registered_ops()
    run(ops, device=device, quick=args.quick, out_dir=args.out, csv_path=args.csv,
        plot_path=args.plot, min_time=args.min_time)
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "bench", help="benchmark fused kernels against eager PyTorch, torch.compile and peers",
        description="Time every op's backends (forward+backward) against eager PyTorch, "
                    "torch.compile of the eager code and peer libraries. Prints a table and "
                    "writes CSV, JSON and a PNG plot under OUT/<device>/.")
    s.add_argument("ops", nargs="*", metavar="OP", help="ops to benchmark (default: all)")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    s.add_argument("--quick", action="store_true", help="one shape per op")
    s.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    s.add_argument("--csv", help="write the CSV here instead")
    s.add_argument("--plot", help="write the PNG plot here instead")
    s.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per measurement")
    s.set_defaults(func=_run)
