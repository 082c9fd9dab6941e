"""TA-DFKD robustness study on the digits default: several teacher architectures, several
seeds, with and without a DAFL-style class prior, beside the noise baseline.

Every run uses the same hyper-parameters (fastkd.methods.tadfkd.TADFKDConfig plus the
overrides given here); only the teacher and the seed change. Writes
OUT/tadfkd_robustness.json (every run, the config, per-teacher mean / std / min) and
OUT/tadfkd_robustness.png.

    PYTHONPATH=. python benchmarks/tadfkd_robustness.py --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _teacher(arch, size, epochs, cache):
    import torch

    from fastkd import data, models
    from fastkd.distill import evaluate, train_teacher

    path = os.path.join(cache, f"digits_{arch}_s{size}_e{epochs}_seed0.pt")
    d = data.digits(size)
    torch.manual_seed(0)
    m = models.create(arch, num_classes=10, in_channels=1)
    if os.path.exists(path):
        m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        m, _ = train_teacher(m, data=d, epochs=epochs, seed=0, progress=False)
        os.makedirs(cache, exist_ok=True)
        torch.save(m.state_dict(), path)
    return m.eval(), evaluate(m, (d[2], d[3]))


def _teacher_job(args):
    import torch

    torch.set_num_threads(1)
    arch, size, epochs, cache = args
    return arch, _teacher(arch, size, epochs, cache)[1]


def _run(job):
    import torch

    torch.set_num_threads(1)
    from fastkd import data, models
    from fastkd.methods.tadfkd import TADFKDConfig, distill, noise_baseline

    arch, seed, variant, size, epochs, cache, overrides = job
    teacher, t_acc = _teacher(arch, size, epochs, cache)
    d = data.digits(size)
    torch.manual_seed(seed)
    student = models.create("cnn_half", num_classes=10, in_channels=1)
    cfg = TADFKDConfig(seed=seed, **overrides)
    if variant == "class_prior":
        cfg.class_prior_weight = 1.0
    t0 = time.perf_counter()
    if variant == "noise":
        acc = noise_baseline(teacher, student, config=cfg, image_shape=(1, size, size), eval_data=(d[2], d[3]))
        curve = []
    else:
        res = distill(teacher, student, config=cfg, image_shape=(1, size, size), eval_data=(d[2], d[3]),
                      progress=False)
        acc = res["final_test_acc"]
        curve = [(r["iter"], r["test_acc"]) for r in res["history"] if "test_acc" in r]
        sel = statistics.fmean(r["selected"] for r in res["history"])
    out = {"teacher": arch, "teacher_test_acc": t_acc, "seed": seed, "variant": variant, "test_acc": acc,
           "curve": curve, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    if variant != "noise":
        out["mean_selected"] = sel
    print(f"[{arch} seed {seed} {variant}] student test acc {100 * acc:.2f}% "
          f"(teacher {100 * t_acc:.2f}%, {out['seconds']:.0f} s)", flush=True)
    return out


def _summarise(runs):
    summ = {}
    for r in runs:
        key = f"{r['teacher']}/{r['variant']}"
        summ.setdefault(key, []).append(r["test_acc"])
    out = {}
    for k, v in summ.items():
        out[k] = {"n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                  "min": min(v), "max": max(v), "accs": v}
    return out


def _plot(runs, summary, teachers, variants, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.9 * len(teachers) * len(variants) / 2 + 3, 4.5))
    width = 0.8 / len(variants)
    colors = {"tadfkd": "tab:blue", "class_prior": "tab:orange", "noise": "tab:gray"}
    labels = {"tadfkd": "TA-DFKD (no class prior)", "class_prior": "+ DAFL class prior",
              "noise": "noise baseline"}
    for j, v in enumerate(variants):
        xs, ms, ss = [], [], []
        for i, t in enumerate(teachers):
            s = summary.get(f"{t}/{v}")
            if not s:
                continue
            xs.append(i + j * width)
            ms.append(100 * s["mean"])
            ss.append(100 * s["std"])
            pts = [100 * r["test_acc"] for r in runs if r["teacher"] == t and r["variant"] == v]
            ax.scatter([i + j * width] * len(pts), pts, color="black", s=8, zorder=3)
        ax.bar(xs, ms, width, yerr=ss, capsize=3, color=colors.get(v), label=labels.get(v, v), alpha=0.85)
    t_acc = {r["teacher"]: r["teacher_test_acc"] for r in runs}
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(teachers))])
    ax.set_xticklabels([f"{t}\n(teacher {100 * t_acc.get(t, float('nan')):.1f}%)" for t in teachers], fontsize=8)
    ax.axhline(88, color="green", ls="--", lw=0.8, label="target 88%")
    ax.axhline(80, color="red", ls=":", lw=0.8, label="collapse line 80%")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="cnn_bn,cnn_deep,resnet8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="tadfkd,class_prior,noise")
    p.add_argument("--size", type=int, default=8, help="digits image side (default: %(default)s, native)")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-s", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(ROOT, "runs", "teachers"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "tadfkd"))
    args = p.parse_args(argv)
    teachers = args.teachers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    overrides = {"iterations": args.iterations, "batch_size": args.batch_size, "eval_every": args.eval_every}
    if args.lr_s is not None:
        overrides["lr_s"] = args.lr_s
    os.makedirs(args.out, exist_ok=True)
    print(f"training / loading {len(teachers)} teachers (size {args.size}, {args.teacher_epochs} epochs)", flush=True)
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(max(1, min(args.workers, len(teachers)))) as pool:
        for t, acc in pool.imap_unordered(_teacher_job, [(t, args.size, args.teacher_epochs, args.cache)
                                                         for t in teachers]):
            print(f"  teacher {t}: test acc {100 * acc:.2f}%", flush=True)
    # seed-major, the method itself first: partial results are the most useful ones
    jobs = [(t, s, v, args.size, args.teacher_epochs, args.cache, overrides)
            for s in seeds for v in variants for t in teachers]
    print(f"{len(jobs)} runs on {args.workers} worker(s)", flush=True)
    json_path = os.path.join(args.out, "tadfkd_robustness.json")
    png_path = os.path.join(args.out, "tadfkd_robustness.png")
    runs = []
    t0 = time.perf_counter()

    def save():
        summary = _summarise(runs)
        meta = {"size": args.size, "teacher_epochs": args.teacher_epochs, "overrides": overrides,
                "teachers": teachers, "seeds": seeds, "variants": variants, "student": "cnn_half",
                "elapsed_s": time.perf_counter() - t0, "argv": sys.argv, "complete": len(runs) == len(jobs)}
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
        _plot(runs, summary, teachers, variants, png_path,
              f"TA-DFKD on digits {args.size}x{args.size}, student cnn_half, {len(seeds)} seeds "
              f"({len(runs)}/{len(jobs)} runs)")
        return summary

    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for r in pool.imap_unordered(_run, jobs):
                runs.append(r)
                save()
    else:
        for j in jobs:
            runs.append(_run(j))
            save()
    summary = save()
    for k, s in sorted(summary.items()):
        print(f"{k:<28} mean {100 * s['mean']:.2f}%  std {100 * s['std']:.2f}  min {100 * s['min']:.2f}%  "
              f"(n={s['n']})")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
