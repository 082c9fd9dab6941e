"""`fastkd synthesize`: CAKE/LAKE data synthesis from a teacher, without data."""


def _run(a) -> int:
    import os

    import torch

    from fastkd.methods._cli import resolve_teacher
    from fastkd.methods.cake import _device, _init_distributed, _rank, save_sample_grid, synthesis_kwargs
    from fastkd.synthesis import cake

    _init_distributed()
    dev = _device(a.device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    teacher, _info, k, shape = resolve_teacher(a, dev)
    ds = cake(teacher, num_classes=k, input_shape=shape, langevin=(a.method == "lake"), seed=a.seed, device=dev,
              progress=not a.quiet, out_dir=a.out, **synthesis_kwargs(a))
    if _rank() == 0:
        path = os.path.join(a.out, "dataset.pt")
        ds.save(path)
        print(f"{ds}: teacher agrees with the intended label on {100 * ds.teacher_agreement():.1f}%")
        print(f"written to {path} (load with fastkd.synthesis.SyntheticDataset.load)")
        if not a.no_grid:
            try:
                print(f"sample grid: {save_sample_grid(ds, os.path.join(a.out, 'samples.png'))}")
            except ImportError:
                print("matplotlib is not installed: no sample grid written")
    return 0


def register(sub) -> None:
    from fastkd.methods._cli import add_teacher_args
    from fastkd.methods.cake import add_synthesis_args

    s = sub.add_parser(
        "synthesize", help="synthesise a data set from a teacher with CAKE or LAKE (no data needed)",
        description="Synthesise inputs on which the teacher's decision boundaries show, by gradient descent on "
                    "the inputs (CAKE), optionally with explicit Langevin noise (LAKE). Each finished batch is "
                    "written to OUT at once; rerunning the same command resumes. Under torchrun the batches are "
                    "split between the processes. Writes OUT/dataset.pt (fastkd.synthesis.SyntheticDataset) and "
                    "OUT/samples.png.",
        epilog="example: fastkd synthesize --teacher digits --num-samples 2000 --out runs/digits-syn",
    )
    s.add_argument("--method", choices=["cake", "lake"], default="cake")
    add_teacher_args(s)
    add_synthesis_args(s)
    s.add_argument("--out", required=True, help="output folder (shards, dataset.pt, samples.png)")
    s.add_argument("--seed", type=int, default=0, help="batch b depends on (seed, b) (default: 0)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--no-grid", action="store_true", help="do not write samples.png")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_run)
