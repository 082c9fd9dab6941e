"""One CAKE/LAKE configuration on the Fashion-MNIST row, as one JSON line: the runs behind
the ablation table of docs/cake.md ("Fashion-MNIST: what moves the student").

Teacher: the bundled LeNet-5 (``fmnist``); student: LeNet-5-Half trained with
:func:`fastkd.distill.train_student`; one seed per call. The configuration is a JSON object
overriding the keys of ``BASE`` (n: samples, bs: batch, steps, lr: [first, last] step
size, w_*: loss weights, clamp: keep inputs in the pixel range, langevin, epochs, augment,
slr / sbs: student lr and batch, prior: "normal" or "smooth:K" (N(0, I) at KxK, upsampled),
teacher: "fmnist" (LeNet-5) or "fmnist-bn"; bn: the BN-statistics prior's weight;
jit / jflip: random roll by up to jit pixels / horizontal flip of the teacher's input at
every synthesis step, loss / temp: the student's loss and temperature; prior may also be
"dark:S" (the pixel range's low end plus |N(0, S^2)|), "level:S" (a per-sample level drawn
from the pixel range plus N(0, S^2)) or "unif" (uniform in the pixel range); istats: with bn,
pull each batch's input mean and variance to the normalisation's (0, 1); res: optimise a
res x res image that the teacher sees upsampled to 32x32; snaps: also keep the same batches
after each of these step counts; adv: rounds of student-in-the-loop inputs (see
_adversarial_rounds); eval_every: evaluate the student every k epochs and record the curve; keep_lr: [lo, hi],
train the student only on the batches whose step size lies in that range, as the authors'
TarDataset does); sinit: "teacher" starts the student from the teacher's channels
(:func:`fastkd.models.init_from_teacher`); sseed: the student's seed (default: seed); prior
"silhouette" (objects on a black background, :func:`fastkd.synthesis.silhouette_prior`, needs
clamp) or "silhouette:G" (its field on a G x G grid); border: the teacher sees a black frame of
this width during synthesis, and the stored samples have it.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fmnist_ablation.py '{"clamp": true, "lr": [1, 0.01]}'
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from fastkd import data, distill, models
from fastkd.synthesis import cake
from fastkd.teachers import fmnist_teacher

BASE = dict(n=5000, bs=100, steps=50, lr=[1e-1, 1e-5], w_cls=1e3, w_contr=1e1, w_tv=1e5, clamp=False,
            langevin=False, epochs=30, augment="shift", slr=0.1, sbs=64, seed=0, schedule="loglinear",
            prior="normal", student="lenet5_half", tag="", teacher="fmnist", bn=0.0)
OUT = "benchmarks/results/fmnist/ablation.jsonl"


class _Framed(torch.nn.Module):
    """The teacher behind a black frame: the outer ``width`` pixels are set to ``lo``."""

    def __init__(self, t, width, lo):
        super().__init__()
        self.t, self.width, self.lo = t, width, lo

    def frame(self, x):
        m = torch.zeros_like(x, dtype=torch.bool)
        w = self.width
        m[..., w:-w, w:-w] = True
        return torch.where(m, x, torch.full_like(x, self.lo))

    def forward(self, x):
        return self.t(self.frame(x))


class _Jitter(torch.nn.Module):
    """The teacher behind a random roll / flip of its input (DeepInversion's jitter)."""

    def __init__(self, t, shift, flip):
        super().__init__()
        self.t, self.shift, self.flip = t, shift, flip

    def forward(self, x):
        if self.shift:
            dx, dy = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            x = torch.roll(x, (dx, dy), (2, 3))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return self.t(x)


class _Upsampled(torch.nn.Module):
    """The teacher behind a bilinear upsampling of its input to size x size."""

    def __init__(self, t, size):
        super().__init__()
        self.t, self.size = t, size

    def up(self, x):
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.t(self.up(x))


class _InputStats(torch.nn.Module):
    """The teacher behind an identity BatchNorm whose running statistics are the
    normalisation's (mean 0, variance 1): the BN prior (bn) then pulls each synthetic batch's
    per-channel mean and variance to those of normalised real inputs."""

    def __init__(self, t):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(1, eps=0.0).eval()
        self.t = t

    def forward(self, x):
        return self.t(self.bn(x))


def _adversarial_rounds(T, s, ds, adv, cfg, info, eval_data):
    """adv: {"rounds", "n" (new inputs per round), "steps", "lr", "epochs"}: each round starts
    from n stored inputs, takes `steps` signed-gradient ascent steps on KL(teacher || student)
    (clamped to the pixel range), adds them with the teacher's answers, and trains the student
    on the union for `epochs` more epochs."""
    from fastkd.synthesis import SyntheticDataset
    lo, hi = info["pixel_range"]
    gen = torch.Generator().manual_seed(cfg["seed"] + 1000)
    h = None
    for r in range(adv.get("rounds", 1)):
        idx = torch.randperm(len(ds), generator=gen)[: adv["n"]]
        xs = []
        for chunk in idx.split(500):
            x = ds.inputs[chunk].clone().requires_grad_(True)
            for _ in range(adv["steps"]):
                with torch.enable_grad():
                    pt = F.softmax(T(x), 1)
                    kl = (pt * (torch.log(pt + 1e-8) - F.log_softmax(s(x), 1))).sum()
                    (g,) = torch.autograd.grad(kl, x)
                with torch.no_grad():
                    x += adv["lr"] * g.sign()
                    x.clamp_(lo, hi)
            xs.append(x.detach())
        xa = torch.cat(xs)
        pa = distill.teacher_probs(T, xa)
        ds = SyntheticDataset(torch.cat([ds.inputs, xa]), torch.cat([ds.probs, pa]),
                              torch.cat([ds.labels, pa.argmax(1)]), ds.meta)
        h = distill.train_student(s, ds, teacher=T, epochs=adv["epochs"], batch_size=cfg["sbs"], lr=cfg["slr"],
                                  augment=None if cfg["augment"] == "none" else cfg["augment"],
                                  eval_data=eval_data, eval_every=adv["epochs"], seed=cfg["seed"] + r + 1,
                                  progress=False)
        print(f"adv round {r}: {len(ds)} samples, student {100 * h.final_accuracy:.2f} %", file=sys.stderr)
    return ds, h


def report(path: str = OUT) -> str:
    """A markdown table of the rows in ``path``: what differs from BASE, accuracy, times."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = ["| change from BASE | samples x steps | seed | student acc (%) | teacher agreement (%) | synthesis s | student s |",
           "|---|---|---|---|---|---|---|"]
    skip = {"curve", "acc", "agree", "syn_s", "stu_s", "threads", "tag", "n", "steps", "seed", "xstd", "xmean", "pred_hist", "note"}
    for r in rows:
        diff = ", ".join([f"{k}={r[k]}" for k in r if k not in skip and k in BASE and r[k] != BASE[k]]
                         + [f"{k}={r[k]}" for k in r if k not in skip and k not in BASE])
        out.append(f"| {diff or '(BASE)'} | {r['n']} x {r['steps']} | {r['seed']} | {100 * r['acc']:.1f} | "
                   f"{100 * r['agree']:.0f} | {r['syn_s']:.0f} | {r['stu_s']:.0f} |")
    return "\n".join(out)


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="{}", help="JSON object overriding BASE")
    p.add_argument("--out", default=OUT, help="JSON lines, appended (default: %(default)s)")
    p.add_argument("--report", action="store_true", help="only print the markdown table of --out")
    a = p.parse_args()
    if a.report:
        print(report(a.out))
        return 0
    cfg = dict(BASE)
    try:
        over = json.loads(a.config)
    except json.JSONDecodeError as e:
        p.error(f"config must be a JSON object, got {a.config!r} ({e.msg})")
    if not isinstance(over, dict) or any(k not in BASE and k not in ("jit", "jflip", "loss", "temp", "adv", "istats", "snaps", "res", "eval_every", "keep_lr", "sinit", "sseed", "border") for k in over):
        p.error(f"config must be a JSON object with keys from {sorted(BASE) + ['adv', 'eval_every', 'istats', 'jflip', 'jit', 'keep_lr', 'loss', 'res', 'sinit', 'snaps', 'sseed', 'temp', 'border']}, "
                f"got {a.config!r}")
    cfg.update(over)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    T, _ = fmnist_teacher(cfg["teacher"])
    _, _, xt, yt = data.fmnist(32)
    info = data.fmnist_info(32)
    prior = cfg["prior"]
    if prior.startswith("smooth"):
        k = int(prior.split(":")[1])

        def prior(shape, gen, k=k):
            z = torch.randn((shape[0], shape[1], k, k), generator=gen)
            return F.interpolate(z, size=shape[2:], mode="bilinear", align_corners=False)
    elif prior.startswith("dark"):  # black background (the pixel range's low end) plus |N(0, s^2)|
        sd = float(prior.split(":")[1])
        lo_px = info["pixel_range"][0]

        def prior(shape, gen, sd=sd, lo_px=lo_px):
            return lo_px + sd * torch.randn(shape, generator=gen).abs()
    elif prior.startswith("level"):  # per-sample brightness level U(lo, hi) plus N(0, s^2)
        sd = float(prior.split(":")[1])
        lo_px, hi_px = info["pixel_range"]

        def prior(shape, gen, sd=sd, lo_px=lo_px, hi_px=hi_px):
            lvl = lo_px + (hi_px - lo_px) * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen)
            return lvl + sd * torch.randn(shape, generator=gen)
    elif prior.startswith("silhouette:"):  # the silhouette prior with another grid (default 4)
        from fastkd.synthesis import silhouette_prior

        prior = silhouette_prior(*info["pixel_range"], grid=int(prior.split(":")[1]))
    elif prior == "unif":  # uniform in the pixel range
        lo_px, hi_px = info["pixel_range"]

        def prior(shape, gen, lo_px=lo_px, hi_px=hi_px):
            return lo_px + (hi_px - lo_px) * torch.rand(shape, generator=gen)
    if cfg.get("istats"):  # the inputs' batch statistics pulled to the normalisation's (0, 1)
        syn_base = _InputStats(T)
    else:
        syn_base = T
    syn_t = _Jitter(syn_base, cfg.get("jit", 0), cfg.get("jflip", False)) if (cfg.get("jit") or cfg.get("jflip")) else syn_base
    res = cfg.get("res")  # optimise a (res x res) image that the teacher sees upsampled to 32x32
    if res:
        syn_t = _Upsampled(syn_t, 32)
    border = cfg.get("border", 0)  # the teacher sees a black frame of this width during synthesis
    if border:
        syn_t = _Framed(syn_t, border, info["pixel_range"][0])
    t0 = time.time()
    ds = cake(syn_t, num_classes=10, input_shape=(1, res or 32, res or 32), num_samples=cfg["n"], batch_size=cfg["bs"],
              steps=cfg["steps"], w_cls=cfg["w_cls"], w_contr=cfg["w_contr"], w_tv=cfg["w_tv"], lr=tuple(cfg["lr"]),
              schedule=cfg["schedule"], langevin=cfg["langevin"], clamp=info["pixel_range"] if cfg["clamp"] else None,
              seed=cfg["seed"], progress=False, prior=prior,
              bn_prior_weight=cfg["bn"])
    if border:  # what is stored is what the teacher saw
        ds = type(ds)(syn_t.frame(ds.inputs), ds.probs, ds.labels, ds.meta)
    if res:
        ds = type(ds)(syn_t.up(ds.inputs), ds.probs, ds.labels, ds.meta)
    for k in cfg.get("snaps", []):  # the same batches after k < steps steps, as extra samples
        snap = cake(syn_t, num_classes=10, input_shape=(1, 32, 32), num_samples=cfg["n"], batch_size=cfg["bs"],
                    steps=k, w_cls=cfg["w_cls"], w_contr=cfg["w_contr"], w_tv=cfg["w_tv"], lr=tuple(cfg["lr"]),
                    schedule=cfg["schedule"], langevin=cfg["langevin"],
                    clamp=info["pixel_range"] if cfg["clamp"] else None, seed=cfg["seed"], progress=False,
                    prior=prior, bn_prior_weight=cfg["bn"])
        ds = type(ds)(torch.cat([ds.inputs, snap.inputs]), torch.cat([ds.probs, snap.probs]),
                      torch.cat([ds.labels, snap.labels]), ds.meta)
    keep = cfg.get("keep_lr")  # the authors' TarDataset: only batches whose step size is in [lo, hi]
    if keep:
        from fastkd.synthesis import step_sizes
        lrs = torch.tensor(step_sizes(-(-cfg["n"] // cfg["bs"]), *cfg["lr"], cfg["schedule"]))
        m = ((lrs >= keep[0]) & (lrs <= keep[1])).repeat_interleave(cfg["bs"])[: len(ds)]
        ds = type(ds)(ds.inputs[m], ds.probs[m], ds.labels[m], ds.meta)
    syn_s = time.time() - t0
    sseed = cfg.get("sseed", cfg["seed"])
    torch.manual_seed(sseed)
    s = models.create(cfg["student"], num_classes=10, in_channels=1, input_size=32)
    if cfg.get("sinit") == "teacher":
        models.init_from_teacher(s, T)
    t0 = time.time()
    h = distill.train_student(s, ds, teacher=T, epochs=cfg["epochs"], batch_size=cfg["sbs"], lr=cfg["slr"],
                              augment=None if cfg["augment"] == "none" else cfg["augment"], eval_data=(xt, yt),
                              eval_every=cfg.get("eval_every", cfg["epochs"]), seed=sseed, progress=False,
                              loss=cfg.get("loss", "soft_ce"), temperature=cfg.get("temp", 1.0))
    adv = cfg.get("adv")
    if adv:  # student in the loop: rounds of inputs where student and teacher disagree most
        ds, h = _adversarial_rounds(T, s, ds, adv, cfg, info, (xt, yt))
    if cfg.get("eval_every"):
        cfg["curve"] = [round(e["eval_acc"], 4) for e in h.epochs if "eval_acc" in e]
    res = dict(cfg, acc=h.final_accuracy, agree=ds.teacher_agreement(), syn_s=syn_s, stu_s=time.time() - t0,
               threads=torch.get_num_threads())
    print(json.dumps(res))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
