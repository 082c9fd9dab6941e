"""Accuracy study of CAKE/LAKE on the bundled digits default.

For every seed and method: synthesise with fastkd and with the eager authors' loop
(same teacher, sample and step budget, same starting points), distil the demo's student
on each, and distil the same student on teacher-labelled N(0, I) inputs (the no-skill
baseline, same sample and epoch budget). Writes a JSON file and prints mean / spread.

    PYTHONPATH=. python benchmarks/cake_accuracy.py --seeds 0 1 2 --out benchmarks/results/cake_accuracy.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fastkd import data, distill, models
from fastkd.methods.cake import DEMO, noise_baseline, student_kwargs
from fastkd.synthesis import cake
from fastkd.synthesis.reference import authors_loop
from fastkd.teachers import digits_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["cake", "lake"], choices=["cake", "lake"])
    p.add_argument("--num-samples", type=int, default=DEMO["num_samples"])
    p.add_argument("--steps", type=int, default=DEMO["steps"])
    p.add_argument("--epochs", type=int, default=DEMO["epochs"])
    p.add_argument("--augment", choices=["shift", "none"], default=DEMO["augment"],
                   help="the student recipe's teacher-relabelled shift augmentation (same for every run)")
    p.add_argument("--no-reference", action="store_true", help="skip the authors' loop")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the noise baseline (e.g. when another run of these seeds has it)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/cake_accuracy.json")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only combine these result files into --out")
    a = p.parse_args()
    if a.merge:
        merge(a.merge, a.out)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher, _ = digits_teacher()
    size = DEMO["size"]
    _, _, x_te, y_te = data.digits(size)
    test = (x_te, y_te)
    shape = (1, size, size)
    t_acc = distill.evaluate(teacher, test)
    aug = None if a.augment == "none" else a.augment
    train_kw = dict(epochs=a.epochs, batch_size=DEMO["student_batch_size"], lr=DEMO["student_lr"],
                    augment=aug,
                    eval_every=a.epochs, progress=False)
    syn_kw = dict(num_classes=10, input_shape=shape, num_samples=a.num_samples, batch_size=DEMO["batch_size"],
                  steps=a.steps, w_cls=DEMO["w_cls"], w_contr=DEMO["w_contr"], w_tv=DEMO["w_tv"], lr=DEMO["lr"],
                  schedule=DEMO["schedule"])

    def student(seed):
        torch.manual_seed(seed)
        return models.create(DEMO["student"], num_classes=10, in_channels=1, **student_kwargs(DEMO["student"], shape))

    rows = []

    def dump():  # written after every run, so an interrupted study keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"teacher_accuracy": t_acc, "rows": rows, "partial": True, "threads": torch.get_num_threads(),
                       "config": {**syn_kw, **train_kw,
                                  "student": DEMO["student"]}}, f, indent=1)

    for seed in a.seeds:
        if not a.no_baseline:
            hb = noise_baseline(teacher, student(seed), num_samples=a.num_samples, input_shape=shape, seed=seed,
                                eval_data=test, **train_kw)
            rows.append({"seed": seed, "run": "baseline", "acc": hb.final_accuracy})
            print(f"seed {seed} baseline {100 * hb.final_accuracy:.2f}%", flush=True)
            dump()
        loops = [("fastkd", cake)] + ([] if a.no_reference else [("authors", authors_loop)])
        for name, fn in loops:  # fastkd first for every method, then the reference
            for method in a.methods:
                t0 = time.perf_counter()
                ds = fn(teacher, langevin=(method == "lake"), seed=seed, progress=False, **syn_kw)
                syn_s = time.perf_counter() - t0
                h = distill.train_student(student(seed), ds, teacher=teacher, eval_data=test, seed=seed, **train_kw)
                rows.append({"seed": seed, "run": f"{method}-{name}", "acc": h.final_accuracy,
                             "synthesis_seconds": syn_s, "agreement": ds.teacher_agreement(),
                             "throughput": a.num_samples * a.steps / syn_s})
                print(f"seed {seed} {method}-{name}: {100 * h.final_accuracy:.2f}% (synthesis {syn_s:.0f}s, "
                      f"{a.num_samples * a.steps / syn_s:.0f} sample-steps/s)", flush=True)
                dump()
    config = {**syn_kw, **train_kw, "student": DEMO["student"]}
    write_summary(a.out, t_acc, config, torch.get_num_threads(), rows)


def write_summary(out, t_acc, config, threads, rows):
    """Mean, spread, min and max per run over the seeds in ``rows``; printed and written to ``out``."""
    summary = {"teacher_accuracy": t_acc, "config": config, "threads": threads, "rows": rows, "runs": {}}
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nteacher {100 * t_acc:.2f}%  (seeds {seeds}, {config['num_samples']} samples x {config['steps']} "
          f"steps, {config['epochs']} student epochs, augment {config.get('augment')})")
    for run in dict.fromkeys(r["run"] for r in rows):
        accs = [r["acc"] for r in rows if r["run"] == run]
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary["runs"][run] = {"mean": mean, "std": sd, "min": min(accs), "max": max(accs), "accs": accs}
        tp = [r["throughput"] for r in rows if r["run"] == run and "throughput" in r]
        print(f"{run:<16} {100 * mean:6.2f}% +- {100 * sd:4.2f}  (min {100 * min(accs):.2f}, max {100 * max(accs):.2f})"
              + (f"  {statistics.mean(tp):.0f} sample-steps/s" if tp else ""))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out}")


def merge(paths, out):
    """Combine the rows of several runs of this script (e.g. seeds run in parallel)."""
    docs = [json.load(open(p)) for p in paths]
    rows = [r for d in docs for r in d["rows"]]
    write_summary(out, docs[0]["teacher_accuracy"], docs[0].get("config", {}), docs[0].get("threads"), rows)

if __name__ == "__main__":
    main()
