"""Fashion-MNIST yardstick: every method side by side on the CAKE paper's row.

Teacher: the bundled LeNet-5 (``fastkd.teachers.fmnist_teacher("fmnist")``, 90.66 %; the
paper's 91.0), or the bundled BatchNorm CNN for TA-DFKD (it needs BN statistics).
Student: LeNet-5-Half. Test split of Fashion-MNIST (32x32, ``fastkd.data.fmnist``), which
the data-free methods never see otherwise.

Rows (``--methods``):

* ``cake`` / ``lake``: fastkd's synthesis (:func:`fastkd.synthesis.cake`) and student recipe;
* ``cake-authors``: the eager authors' loop (:func:`fastkd.synthesis.reference.authors_loop`)
  with the authors' FMNIST configuration (weights cls 1e3, contr 1e-3, tv 1e7, step sizes
  1e-1 -> 1e-5, no clamp) at the same sample and step budget, distilled with the same student
  recipe;
* ``noise``: the no-skill baseline (the student recipe on teacher-labelled draws of the
  synthesis prior: the silhouette prior at the default budget, N(0, I) at ``normal``);
* ``kd-real``: plain KD on the real (unlabelled) training images, the upper bound;
* ``tadfkd``: TA-DFKD against the BN teacher;
* ``mekd-soft`` / ``mekd-hard``: MEKD against the teacher behind fastkd's HTTP server, the
  unlabelled training images as edge data, 20,000 paid queries.

Budgets (``--budget``): ``default`` is ``fastkd demo --data fmnist``'s (20,000 samples x 12
steps, the silhouette prior, contrastive weight 1, the student from the teacher's channels);
``contr10`` the same at the contrastive weight 10; ``normal`` that from N(0, I) inputs;
``scratch`` from N(0, I) with the student's own initialisation (peak lr 0.2); ``authors-3x``
/ ``authors-4x`` give the authors' loop 72 / 96 steps, about 3x / 4x the default row's wall
time; ``large`` takes 100 steps per sample (about 10 minutes of CAKE synthesis on one core);
the paper's 512 x 500 samples x 256 steps (65.5 million sample-steps, hours here) is not
affordable on this CPU. Every row is appended to
``--out`` (JSON lines) as soon as it finishes; a rerun skips the (method, budget, seed) rows
already there, so an interrupted study resumes. ``--report`` writes the markdown table and
the accuracy-against-wall-time PNG from the JSON lines.

    PYTHONPATH=. python benchmarks/fmnist_study.py --methods cake noise kd-real --seeds 0 1 2
    PYTHONPATH=. python benchmarks/fmnist_study.py --report
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from fastkd import data, distill, models
from fastkd.methods.cake import FMNIST_DEMO, noise_baseline

OUT = "benchmarks/results/fmnist/study.jsonl"
PAPER = {"teacher": 91.0, "cake": 76.5, "cake_std": 1.0, "zsdb3kd": 72.3, "kd_real": 89.7}
BUDGETS = {
    "default": dict(FMNIST_DEMO),
    # the silhouette prior with the contrastive weight of the N(0, I) recipe (10; the default is 1)
    "contr10": dict(FMNIST_DEMO, w_contr=10.0),
    # the recipe before the silhouette prior: N(0, I) inputs (clamped), the student from the teacher's channels
    "normal": dict(FMNIST_DEMO, prior="normal", w_contr=10.0),
    # the recipe before the student started from the teacher's channels: its own initialisation, peak lr 0.2
    "scratch": dict(FMNIST_DEMO, student_lr=0.2, student_init="scratch", prior="normal", w_contr=10.0),
    # the authors' loop at about 3x and 4x the wall time of fastkd's default row (20,000 x 72 and x 96 steps)
    "authors-3x": dict(FMNIST_DEMO, steps=72),
    "authors-4x": dict(FMNIST_DEMO, steps=96),
    "large": dict(FMNIST_DEMO, steps=100),
    # a few seconds per row: checks that every row runs (tests), measures nothing
    "smoke": dict(FMNIST_DEMO, num_samples=200, steps=2, epochs=1, tadfkd_iterations=2, mekd_budget=300,
                  mekd_gan_steps=2, mekd_epochs=1),
}
METHODS = ["cake", "lake", "cake-authors", "noise", "kd-real", "tadfkd", "mekd-soft", "mekd-hard"]
#: The authors' FMNIST configuration (their weights for fmnist-32 and their step-size schedule,
#: no clamp), used by the authors' loop row at the budget's sample and step counts.
AUTHORS_FMNIST = dict(w_cls=1e3, w_contr=1e-3, w_tv=1e7, lr=(1e-1, 1e-5), schedule="loglinear")


def _student(seed: int, cfg: dict | None = None, teacher=None):
    """LeNet-5-Half; started from ``teacher``'s channels when the budget says so (white-box
    methods only: TA-DFKD's teacher is another family and MEKD's has no weights to read)."""
    torch.manual_seed(seed)
    s = models.create("lenet5_half", num_classes=10, in_channels=1)
    if cfg is not None and teacher is not None and cfg.get("student_init") == "teacher":
        models.init_from_teacher(s, teacher)
    return s


def _train_kw(cfg):
    return dict(epochs=cfg["epochs"], batch_size=cfg["student_batch_size"], lr=cfg["student_lr"],
                augment=cfg["augment"], eval_every=cfg["epochs"], progress=False)


def _syn_kw(cfg, info, seed):
    return dict(num_classes=10, input_shape=info["input_shape"], num_samples=cfg["num_samples"],
                batch_size=cfg["batch_size"], steps=cfg["steps"], w_cls=cfg["w_cls"], w_contr=cfg["w_contr"],
                w_tv=cfg["w_tv"], lr=tuple(cfg["lr"]), schedule=cfg["schedule"], seed=seed, progress=False,
                prior=cfg.get("prior", "normal"))


def run_row(method: str, budget: str, seed: int) -> dict:
    from fastkd.synthesis import cake
    from fastkd.teachers import fmnist_teacher

    cfg = dict(BUDGETS[budget])
    info = data.fmnist_info(32)
    x_tr, _, x_te, y_te = data.fmnist(32)
    test = (x_te, y_te)
    teacher, _ = fmnist_teacher("fmnist")
    row = {"method": method, "budget": budget, "seed": seed}
    t0 = time.perf_counter()
    if method in ("cake", "lake"):
        clamp = info["pixel_range"] if cfg.get("clamp") else None
        ds = cake(teacher, langevin=(method == "lake"), clamp=clamp, **_syn_kw(cfg, info, seed))
        row["synthesis_s"] = time.perf_counter() - t0
        row["teacher_agreement"] = ds.teacher_agreement()
        s = _student(seed, cfg, teacher)
        t1 = time.perf_counter()
        h = distill.train_student(s, ds, teacher=teacher, eval_data=test, seed=seed, **_train_kw(cfg))
        row.update(student_s=time.perf_counter() - t1, accuracy=h.final_accuracy, config=cfg)
    elif method == "cake-authors":
        from fastkd.synthesis.reference import authors_loop

        kw = _syn_kw(dict(cfg, **AUTHORS_FMNIST), info, seed)
        kw.pop("prior")  # their loop starts from N(0, I)
        ds = authors_loop(teacher, **kw)
        row["synthesis_s"] = time.perf_counter() - t0
        s = _student(seed, cfg, teacher)
        t1 = time.perf_counter()
        h = distill.train_student(s, ds, teacher=teacher, eval_data=test, seed=seed, **_train_kw(cfg))
        row.update(student_s=time.perf_counter() - t1, accuracy=h.final_accuracy,
                   config=dict(cfg, **AUTHORS_FMNIST, clamp=False, prior="normal"))
    elif method == "noise":
        h = noise_baseline(teacher, _student(seed, cfg, teacher), num_samples=cfg["num_samples"], input_shape=info["input_shape"],
                           eval_data=test, seed=seed, clamp=info["pixel_range"] if cfg.get("clamp") else None,
                           prior=cfg.get("prior", "normal"), **_train_kw(cfg))
        row.update(synthesis_s=0.0, student_s=time.perf_counter() - t0, accuracy=h.final_accuracy, config=cfg)
    elif method == "kd-real":
        g = torch.Generator().manual_seed(seed)
        x = x_tr[torch.randperm(x_tr.shape[0], generator=g)[:cfg["num_samples"]]]
        h = distill.train_student(_student(seed, cfg, teacher), x, teacher=teacher, eval_data=test, seed=seed, **_train_kw(cfg))
        row.update(synthesis_s=0.0, student_s=time.perf_counter() - t0, accuracy=h.final_accuracy,
                   config=dict(cfg, data="real training images, unlabelled"))
    elif method == "tadfkd":
        from fastkd.methods import tadfkd

        bn_teacher, _ = fmnist_teacher("fmnist-bn")
        tc = tadfkd.TADFKDConfig(seed=seed, eval_every=0, iterations=cfg.get("tadfkd_iterations", 200))
        res = tadfkd.distill(bn_teacher, _student(seed), config=tc, image_shape=info["input_shape"],
                             eval_data=test, progress=False)
        row.update(synthesis_s=0.0, student_s=time.perf_counter() - t0, accuracy=res["final_test_acc"],
                   config={k: v for k, v in res["config"].items()}, teacher="fmnist-bn")
    elif method.startswith("mekd"):
        row.update(_mekd_row(method.split("-")[1], teacher, x_tr, test, seed, info, cfg))
    else:
        raise ValueError(f"unknown method {method!r}")
    row.update(teacher_accuracy=distill.evaluate(teacher if method != "tadfkd" else fmnist_teacher("fmnist-bn")[0],
                                                 test),
               seconds=time.perf_counter() - t0, threads=torch.get_num_threads(), torch=torch.__version__,
               cpu=platform.processor() or platform.machine())
    return row


def _mekd_row(response: str, teacher, x_tr, test, seed, info, budget_cfg) -> dict:
    from fastkd.blackbox import BlackBoxTeacher
    from fastkd.methods.mekd import MEKDConfig, run_mekd
    from fastkd.serve import ServerThread, create_app

    app = create_app(teacher, input_shape=info["input_shape"], num_classes=10, name="fmnist", response=response)
    cfg = MEKDConfig(budget=budget_cfg.get("mekd_budget", 20000), response=response, student="lenet5_half",
                     seed=seed, **{k: budget_cfg[f"mekd_{k}"] for k in ("gan_steps", "epochs")
                                   if f"mekd_{k}" in budget_cfg})
    g = torch.Generator().manual_seed(seed)
    edge = x_tr[torch.randperm(x_tr.shape[0], generator=g)]
    t0 = time.perf_counter()
    with ServerThread(app) as srv:
        bb = BlackBoxTeacher(url=f"{srv.url}/v2/models/fmnist", response=response, budget=cfg.budget, verbose=False)
        res = run_mekd(bb, edge, num_classes=10, cfg=cfg, eval_data=test, progress=False, log=lambda s: None)
        st = bb.stats()
        bb.close()
    return {"synthesis_s": res.get("seconds_deprivatization", 0.0), "student_s": time.perf_counter() - t0
            - res.get("seconds_deprivatization", 0.0), "accuracy": res["test_acc"], "queries_paid": st["queries_paid_total"],
            "config": res["config"]}


def done_keys(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["method"], r["budget"], r["seed"]) for r in map(json.loads, filter(str.strip, f))}


def report(path: str, md: str, png: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    lines = ["| method | budget | seeds | student accuracy (%) | synthesis s | student s |", "|---|---|---|---|---|---|"]
    pts = []
    for (m, b), rs in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        acc = [100 * r["accuracy"] for r in rs]
        mean = statistics.mean(acc)
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        syn = statistics.mean(r.get("synthesis_s", 0.0) for r in rs)
        stu = statistics.mean(r.get("student_s", 0.0) for r in rs)
        lines.append(f"| {m} | {b} | {len(rs)} | {mean:.1f} ± {sd:.1f} (min {min(acc):.1f}) | {syn:.0f} | {stu:.0f} |")
        pts.append((m, b, syn + stu, mean, sd))
    lines.append(f"| paper: CAKE | 512 x 500 samples x 256 steps | | {PAPER['cake']} ± {PAPER['cake_std']} | | |")
    lines.append(f"| paper: ZSDB3KD | | | {PAPER['zsdb3kd']} | | |")
    lines.append(f"| paper: KD with the real data | | | {PAPER['kd_real']} | | |")
    os.makedirs(os.path.dirname(md) or ".", exist_ok=True)
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    for m, b, sec, mean, sd in pts:
        # colour: the method; marker: the budget (circles: the default recipe)
        ax.errorbar(sec, mean, yerr=sd, fmt={"default": "o", "scratch": "s", "normal": "D", "contr10": "v"}.get(b, "^"), capsize=3,
                    color=plt.get_cmap("tab10")(METHODS.index(m)), mfc="none" if b == "scratch" else None,
                    label=f"{m} ({b})")
    ax.axhline(PAPER["cake"], ls="--", c="gray", lw=1)
    ax.annotate("paper: CAKE 76.5", (0.01, PAPER["cake"] + 0.5), xycoords=("axes fraction", "data"), fontsize=7,
                color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("wall time, synthesis + student (s, one thread per run on a 2-core CPU)")
    ax.set_ylabel("LeNet-5-Half test accuracy (%)")
    ax.set_title("Fashion-MNIST, LeNet-5 teacher: accuracy against wall time", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no point hidden
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print("\n".join(lines))
    print(f"table: {md}\nplot: {png}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["cake", "noise", "kd-real"])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default=OUT, help="JSON lines, appended (default: %(default)s)")
    p.add_argument("--report", action="store_true", help="only write the table and the plot from --out")
    a = p.parse_args()
    md, png = os.path.splitext(a.out)[0] + ".md", os.path.splitext(a.out)[0] + ".png"
    if a.report:
        report(a.out, md, png)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    data.fmnist_info(32)  # fail early, in one line, without the data
    done = done_keys(a.out)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    for seed in a.seeds:
        for m in a.methods:
            if (m, a.budget, seed) in done:
                print(f"skip {m} {a.budget} seed {seed}: already in {a.out}", file=sys.stderr)
                continue
            row = run_row(m, a.budget, seed)
            with open(a.out, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            print(f"{m:<13} {a.budget:<8} seed {seed}: {100 * row['accuracy']:.2f}% "
                  f"(synthesis {row.get('synthesis_s', 0):.0f} s, student {row.get('student_s', 0):.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
