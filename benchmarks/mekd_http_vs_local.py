"""Why a soft-answer run over HTTP differs from the same run against the local module.

The served teacher answers with a float32 softmax (as a real API does); the local
``BlackBoxTeacher(model)`` reads the module's logits and takes the softmax in float64.
The two answers differ by at most ~6e-8 per probability. This script measures that
difference on the edge data, then distils (plain KD and MEKD, soft answers, seed 0,
``MEKDConfig`` defaults) three times: against the local logits, against a local module
that returns the float32 softmax (the server's arithmetic), and over HTTP. Rows go to
benchmarks/results/mekd/http_vs_local_soft.jsonl.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/mekd_http_vs_local.py --methods kd mekd
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class SoftmaxTeacher(torch.nn.Module):
    """The served model's arithmetic: float32 softmax of the logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x).float(), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["kd", "mekd"], choices=["kd", "mekd"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "mekd", "http_vs_local_soft.jsonl"))
    a = p.parse_args()
    torch.set_num_threads(1)
    from fastkd.blackbox import BlackBoxTeacher
    from fastkd.methods import mekd
    from fastkd.serve import ServerThread, create_app
    from fastkd.teachers import digits_teacher

    model, info = digits_teacher()
    edge, test = mekd.digits_edge(shift="none", seed=a.seed)
    cfg = mekd.MEKDConfig(response="soft", seed=a.seed)
    app = create_app(model, input_shape=info["input_shape"], num_classes=info["num_classes"], name="digits",
                     response="soft")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with ServerThread(app) as srv:
        url = f"{srv.url}/v2/models/digits"
        teachers = {
            "local logits": lambda: BlackBoxTeacher(model, response="soft", budget=cfg.budget),
            "local float32 softmax": lambda: BlackBoxTeacher(SoftmaxTeacher(model), response="soft",
                                                             budget=cfg.budget, outputs="probs"),
            "http": lambda: BlackBoxTeacher(url=url, response="soft", budget=cfg.budget),
        }
        x = edge[:1024]
        answers = {k: mk()(x) for k, mk in teachers.items()}
        for k in ("local logits", "local float32 softmax"):
            d = (answers[k] - answers["http"]).abs().max().item()
            print(f"answers, {k} vs http: max |difference| {d:.2e}", flush=True)
        for method in a.methods:
            fn = {"kd": mekd.run_kd, "mekd": mekd.run_mekd}[method]
            for name, mk in teachers.items():
                t0 = time.perf_counter()
                r = fn(mk(), edge, num_classes=10, cfg=cfg, eval_data=test, progress=False, log=lambda s: None)
                row = {"method": method, "teacher": name, "seed": a.seed, "test_acc": r["test_acc"],
                       "max_abs_answer_diff_vs_http": (answers[name] - answers["http"]).abs().max().item(),
                       "seconds": time.perf_counter() - t0}
                print(f"{method} {name}: {100 * r['test_acc']:.2f}%", flush=True)
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
