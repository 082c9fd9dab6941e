"""MEKD against plain KD on the bundled digits default, same edge data and query budget.

Each run: the digits teacher as a black box (BlackBoxTeacher over the local module, the
same accounting as over HTTP), edge data = the digits train split (unlabeled), optionally
shifted, the student evaluated on the test split. One JSON line per run is appended to
``--out`` so that partial results survive; ``--summarize`` prints the mean and spread per
setting as a markdown table and writes a PNG.

    python benchmarks/mekd_vs_kd.py --methods mekd kd --responses hard --shifts none rotate+noise --seeds 0 1 2
    python benchmarks/mekd_vs_kd.py --summarize
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "mekd", "mekd_vs_kd.jsonl")


def run_one(method, response, shift, seed, args):
    from fastkd.blackbox import BlackBoxTeacher
    from fastkd.methods import mekd
    from fastkd.teachers import digits_teacher

    model, _ = digits_teacher()
    edge, test = mekd.digits_edge(shift=shift, seed=seed)
    d = mekd.MEKDConfig()
    cfg = mekd.MEKDConfig(budget=args.budget, response=response,
                          gan_steps=d.gan_steps if args.gan_steps is None else args.gan_steps,
                          epochs=d.epochs if args.epochs is None else args.epochs,
                          ngf=d.ngf if args.ngf is None else args.ngf, seed=seed,
                          w_img=d.w_img if args.w_img is None else args.w_img)
    bb = BlackBoxTeacher(model, response=response, budget=args.budget, name=f"digits:{method}:{seed}")
    fn = {"mekd": mekd.run_mekd, "kd": mekd.run_kd, "noise": mekd.run_noise}[method]
    t0 = time.perf_counter()
    r = fn(bb, edge, num_classes=10, cfg=cfg, eval_data=test, progress=not args.quiet,
           log=lambda s: print(s, file=sys.stderr, flush=True))
    st = bb.stats()
    return {"method": method, "response": response, "shift": shift, "seed": seed, "test_acc": r["test_acc"],
            "queries_paid": st["queries_paid_total"], "budget": args.budget, "transfer_set": r["transfer_set"],
            "gan_steps": cfg.gan_steps if method == "mekd" else 0, "epochs": cfg.epochs, "ngf": cfg.ngf,
            "w_img": cfg.w_img if method == "mekd" else 0.0, "config": "defaults" if args.defaults else "custom",
            "seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(), "grad_clip": cfg.grad_clip}


def summarize(path):
    import statistics
    rows = [json.loads(l) for l in open(path) if l.strip()]
    groups = {}
    for r in rows:
        groups.setdefault((r["response"], r["shift"], r["method"]), []).append(r)
    lines = ["| response | edge shift | method | test acc, mean ± std (%) | seeds | queries paid (max) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (resp, shift, meth), rs in sorted(groups.items()):
        accs = [100 * r["test_acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {resp} | {shift} | {meth} | {statistics.mean(accs):.2f} ± {sd:.2f} "
                     f"({', '.join(f'{a:.1f}' for a in accs)}) | {len(rs)} | {max(r['queries_paid'] for r in rs)} |")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = sorted(groups)
        fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.5))
        means = [statistics.mean(100 * r["test_acc"] for r in groups[k]) for k in keys]
        sds = [statistics.stdev([100 * r["test_acc"] for r in groups[k]]) if len(groups[k]) > 1 else 0 for k in keys]
        ax.bar(range(len(keys)), means, yerr=sds, color=["tab:blue" if k[2] == "mekd" else "tab:gray" for k in keys])
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{k[2]}\n{k[0]}\n{k[1]}" for k in keys], fontsize=7)
        ax.set_ylabel("student test accuracy (%)")
        ax.set_ylim(min(means) - 10, 100)
        ax.set_title("MEKD vs plain KD, digits, same edge data and budget", fontsize=9)
        fig.tight_layout()
        png = os.path.splitext(path)[0] + ".png"
        fig.savefig(png, dpi=110)
        print(f"plot: {png}")
    except ImportError:
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["mekd", "kd"], choices=["mekd", "kd", "noise"])
    p.add_argument("--responses", nargs="+", default=["hard"], choices=["soft", "hard"])
    p.add_argument("--shifts", nargs="+", default=["none", "rotate+noise"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=20000)
    p.add_argument("--gan-steps", type=int, default=None, help="default: MEKDConfig's")
    p.add_argument("--epochs", type=int, default=None, help="default: MEKDConfig's")
    p.add_argument("--ngf", type=int, default=None, help="default: MEKDConfig's")
    p.add_argument("--w-img", type=float, default=None, help="default: MEKDConfig's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on busy machines)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--summarize", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.defaults = all(v is None for v in (args.gan_steps, args.epochs, args.ngf, args.w_img))
    if args.summarize:
        summarize(args.out)
        return 0
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for seed in args.seeds:
        for shift in args.shifts:
            for resp in args.responses:
                for meth in args.methods:
                    r = run_one(meth, resp, shift, seed, args)
                    print(json.dumps(r), flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
