"""MEKD: black-box distillation by aligning generated images (papers/000, GUIDE.md section 2).

The teacher is reached only through :class:`fastkd.blackbox.BlackBoxTeacher` (soft
probabilities or hard top-1 labels, a query budget, a cache). Only unlabeled local "edge"
images are available. Two steps:

1. **Deprivatization.** A DCGAN-style generator ``G: R^C -> image`` whose latent is a
   class-score vector (a centred logit vector, ``v ~ N(0, I)`` projected to zero mean) is
   trained adversarially against the edge images (Adam 2e-4, betas (0.5, 0.999), batch 64),
   plus the information term ``w_info * mean_i(-c_i * log D(G(v_i)))`` where ``c_i`` is the
   teacher's *confidence* on ``G(v_i)`` -- by default its probability of the latent's own
   top class (``confidence="latent"``; ``"max"`` uses the teacher's top probability). The
   released code weights by the argmax class *index* instead: a bug we do not copy.
   The information term needs teacher answers: ``info_per_step`` samples of each batch
   are queried; every answered (image, response) pair joins the transfer set.
2. **Distillation.** G frozen. For a query x with teacher answer t and student logits s:
   ``loss = w_img * ImageMatchingLoss(G(s / tau), G(t / tau)) + w_kl * tau^2 * KL(t/tau || s/tau)``
   with the paired L1 by default (the released code; ``metric="wasserstein-exact"`` etc.
   select an empirical Wasserstein distance). The teacher's answer is turned into a score
   vector: log-probabilities for soft responses (logits up to a constant), the one-hot
   vector for hard ones (as in the released code); G sees centred scores.

Query budget (one query = one image): the edge images are queried once, the information
term spends ``info_per_step * gan_steps``, and the rest of the budget buys images G makes
from random class-score vectors after training. The student then trains for several
epochs on that fixed transfer set: the budget is never exceeded and answers are cached
(``--cache``), so an interrupted run resumes without paying twice.

Defaults (GUIDE.md): tau 5, w_img = w_kl = 1, SGD lr 0.1 momentum 0.9 weight decay 5e-4
(cosine schedule here), DCGAN Adam 2e-4 (0.5, 0.999) batch 64, w_info 0.5 (released code).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastkd._run import Parser as _Parser

METHOD = "mekd"

__all__ = ["MEKDConfig", "Generator", "Discriminator", "deprivatize", "distill_student", "run_mekd",
           "run_kd", "run_noise", "digits_teacher", "digits_edge", "fmnist_edge", "shift_images", "teacher_scores", "image_matching",
           "cli_distill", "cli_demo"]


# ----------------------------------------------------------------------------- networks
class Generator(nn.Module):
    """DCGAN-style generator from a class-score vector (C,) to an image (channels, H, W).

    The scores are centred (softmax-invariant); the output ``tanh`` is mapped affinely to
    ``[lo, hi]`` (the edge data's pixel range). H and W must be divisible by 4."""

    def __init__(self, num_classes: int, img_shape=(1, 16, 16), ngf: int = 64, lo: float = -1.0,
                 hi: float = 1.0) -> None:
        super().__init__()
        c, h, w = img_shape
        if h % 4 or w % 4:
            raise ValueError(f"Generator: image height and width must be divisible by 4, got {img_shape}")
        self.img_shape, self.h0, self.w0, self.ngf = tuple(img_shape), h // 4, w // 4, ngf
        self.fc = nn.Linear(num_classes, 2 * ngf * self.h0 * self.w0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf, ngf // 2, 3, 1, 1), nn.BatchNorm2d(ngf // 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf // 2, c, 3, 1, 1), nn.Tanh())
        self.register_buffer("lo", torch.tensor(float(lo)))
        self.register_buffer("hi", torch.tensor(float(hi)))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = v - v.mean(dim=1, keepdim=True)
        out = self.net(self.fc(v).view(v.shape[0], 2 * self.ngf, self.h0, self.w0))
        return self.lo + (out + 1) * 0.5 * (self.hi - self.lo)


class Discriminator(nn.Module):
    """DCGAN-style discriminator: strided 3x3 convolutions, LeakyReLU, a logit."""

    def __init__(self, img_shape=(1, 16, 16), ndf: int = 16) -> None:
        super().__init__()
        c, h, w = img_shape
        layers, cin = [], c
        for i, cout in enumerate((ndf, 2 * ndf, 4 * ndf)):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
            if i:
                layers.append(nn.BatchNorm2d(cout))
            cin = cout
        self.net = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            n = self.net(torch.zeros(2, c, h, w)).shape[1]
        self.head = nn.Linear(n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)).squeeze(1)


def _init_dcgan(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- pieces
def teacher_scores(answer: torch.Tensor, response: str) -> torch.Tensor:
    """Score vector of a teacher answer: log-probabilities (soft) or the one-hot itself (hard)."""
    if response == "soft":
        return torch.log(answer.float().clamp_min(1e-8))
    return answer.float()


def _paired_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(1).mean()


def image_matching(metric: str = "l1"):
    """The image distance D(a, b) of the distillation loss (fastkd.nn.ImageMatchingLoss)."""
    try:
        from fastkd.nn import ImageMatchingLoss
    except ImportError:  # the op is not built into this tree: paired L1 only
        if metric != "l1":
            raise ValueError(f"image metric {metric!r} needs fastkd.nn.ImageMatchingLoss; only 'l1' is available")
        return _paired_l1
    return ImageMatchingLoss(metric=metric)


def latent_prior(n: int, num_classes: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """Random class-score vectors: N(0, I) logits, centred (G centres them anyway)."""
    v = torch.randn(n, num_classes, generator=gen)
    return (v - v.mean(1, keepdim=True)).to(device or "cpu")


def shift_images(x: torch.Tensor, *, rotate: float = 0.0, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Model an edge/cloud distribution gap: random rotations in [-rotate, rotate] degrees and
    additive Gaussian noise of std ``noise`` (in normalised pixel units), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    if rotate:
        ang = (torch.rand(x.shape[0], generator=g) * 2 - 1) * math.radians(rotate)
        cos, sin = ang.cos(), ang.sin()
        theta = torch.zeros(x.shape[0], 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        bg = x.amin(dim=(1, 2, 3), keepdim=True)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x - bg, grid, align_corners=False, padding_mode="zeros") + bg
    if noise:
        out = out + noise * torch.randn(out.shape, generator=g)
    return out.contiguous()


@dataclass
class MEKDConfig:
    """Every knob of :func:`run_mekd` (defaults: GUIDE.md section 2, scaled to a CPU run)."""
    budget: int = 20000
    response: str = "soft"
    tau: float = 5.0
    w_img: float = 1.0
    w_kl: float = 1.0
    metric: str = "l1"
    # deprivatization
    gan_steps: int = 800
    gan_batch: int = 64
    gan_lr: float = 2e-4
    gan_betas: tuple = (0.5, 0.999)
    ngf: int = 32
    ndf: int = 16
    w_info: float = 0.5
    info_per_step: int = 4
    confidence: str = "latent"
    # distillation
    student: str = "cnn_half"
    epochs: int = 10
    batch_size: int = 128
    edge_weight: float = 0.5
    grad_clip: float = 2.0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    query_batch: int = 256
    seed: int = 0


# ----------------------------------------------------------------------------- step 1
def deprivatize(teacher, edge: torch.Tensor, *, num_classes: int, cfg: MEKDConfig, progress: bool = True,
                log=print):
    """Train G adversarially on the edge images plus the confidence-weighted information term.

    Returns ``(G, xs, ts)``: the frozen generator and the (image, answer) pairs the
    information term paid for."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    shape = tuple(edge.shape[1:])
    lo, hi = float(edge.min()), float(edge.max())
    G = Generator(num_classes, shape, ngf=cfg.ngf, lo=lo, hi=hi)
    D = Discriminator(shape, ndf=cfg.ndf)
    G.apply(_init_dcgan)
    D.apply(_init_dcgan)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.gan_lr, betas=tuple(cfg.gan_betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.gan_lr, betas=tuple(cfg.gan_betas))
    bce = nn.BCEWithLogitsLoss()
    xs, ts = [], []
    t0 = time.perf_counter()
    every = max(1, cfg.gan_steps // 10)
    for step in range(cfg.gan_steps):
        idx = torch.randint(0, edge.shape[0], (cfg.gan_batch,), generator=gen)
        real = edge[idx]
        n = real.shape[0]
        # discriminator
        v = latent_prior(n, num_classes, gen)
        fake = G(v)
        d_loss = bce(D(real), torch.ones(n)) + bce(D(fake.detach()), torch.zeros(n))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # generator: adversarial + information term on the queried part of the batch
        v = latent_prior(n, num_classes, gen)
        fake = G(v)
        logit_fake = D(fake)
        g_loss = bce(logit_fake, torch.ones(n))
        k = min(cfg.info_per_step, n)
        if k and cfg.w_info:
            xq = fake[:k].detach()
            tq = teacher(xq)  # paid queries: no gradient flows through the teacher
            xs.append(xq.clone())
            ts.append(tq.clone())
            if cfg.confidence == "latent":
                conf = tq.gather(1, v[:k].argmax(1, keepdim=True)).squeeze(1)
            else:
                conf = tq.max(1).values
            g_info = -(conf * F.logsigmoid(logit_fake[:k])).mean()
            g_loss = g_loss + cfg.w_info * g_info
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if progress and ((step + 1) % every == 0 or step + 1 == cfg.gan_steps):
            log(f"[mekd] deprivatize {step + 1}/{cfg.gan_steps}: D loss {d_loss.item():.3f} "
                f"G loss {g_loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    G.eval()
    for p in G.parameters():
        p.requires_grad_(False)
    if xs:
        return G, torch.cat(xs), torch.cat(ts)
    return G, edge[:0], torch.zeros(0, num_classes)


def query_all(teacher, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([teacher(x[i:i + batch]) for i in range(0, x.shape[0], batch)]) if len(x) else \
        torch.zeros(0, teacher.num_classes or 0)


# ----------------------------------------------------------------------------- step 2
def _batches(n: int, n_edge: int, bs: int, edge_weight: float, gen: torch.Generator):
    """Index batches for one epoch (n // bs + 1 batches): a fraction ``edge_weight`` of each
    batch from the first ``n_edge`` samples (the edge images), the rest from the others."""
    if not (0 < n_edge < n) or edge_weight <= 0:
        perm = torch.randperm(n, generator=gen)
        return [perm[i:i + bs] for i in range(0, n, bs)]
    k = max(1, int(round(bs * edge_weight)))
    steps = math.ceil(n / bs)
    e = torch.cat([torch.randperm(n_edge, generator=gen) for _ in range(math.ceil(steps * k / n_edge))])
    r = n_edge + torch.cat([torch.randperm(n - n_edge, generator=gen)
                            for _ in range(math.ceil(steps * (bs - k) / (n - n_edge)))])
    return [torch.cat([e[i * k:(i + 1) * k], r[i * (bs - k):(i + 1) * (bs - k)]]) for i in range(steps)]


def distill_student(student: nn.Module, x: torch.Tensor, t: torch.Tensor, *, G: nn.Module | None,
                    cfg: MEKDConfig, eval_data=None, progress: bool = True, log=print, n_edge: int = 0) -> dict:
    """Train ``student`` on the fixed transfer set (x, teacher answers t).

    The first ``n_edge`` samples are the edge images: a fraction ``cfg.edge_weight`` of
    every batch is drawn from them (so a large generated part cannot drown the real
    images). ``G=None`` or ``w_img=0`` gives plain Hinton KD (the baseline)."""
    from fastkd.distill import evaluate
    from fastkd.nn import KDLoss

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    kd = KDLoss(temperature=cfg.tau, target="logits")
    dist = image_matching(cfg.metric) if (G is not None and cfg.w_img) else None
    scores = teacher_scores(t, cfg.response)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=True)
    steps = cfg.epochs * math.ceil(x.shape[0] / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps))
    hist = []
    t0 = time.perf_counter()
    for ep in range(cfg.epochs):
        student.train()
        tot = tot_img = 0.0
        for idx in _batches(x.shape[0], n_edge, cfg.batch_size, cfg.edge_weight, gen):
            s = student(x[idx])
            ts = scores[idx]
            loss = cfg.w_kl * kd(s, ts)
            if dist is not None:
                with torch.no_grad():
                    img_t = G(ts / cfg.tau)
                li = dist(G(s / cfg.tau), img_t)
                loss = loss + cfg.w_img * li
                tot_img += li.item() * idx.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            tot += loss.item() * idx.numel()
        rec = {"epoch": ep + 1, "loss": tot / x.shape[0], "img_loss": tot_img / x.shape[0]}
        if eval_data is not None:
            rec["test_acc"] = evaluate(student, eval_data)
        hist.append(rec)
        if progress:
            log(f"[mekd] student epoch {ep + 1}/{cfg.epochs}: loss {rec['loss']:.4f}"
                + (f" test acc {100 * rec['test_acc']:.2f}%" if "test_acc" in rec else "")
                + f" ({time.perf_counter() - t0:.0f} s)")
    student.eval()
    return {"epochs": hist, "seconds": time.perf_counter() - t0}


def _edge_subset(teacher, edge, budget):
    n = min(edge.shape[0], budget if budget is not None else edge.shape[0])
    return edge[:n]


def query_planned(teacher, x: torch.Tensor, batch: int = 256):
    """``(x[:m], answers)``: the planned query set ``x`` answered in batches, stopping where
    the budget left runs out (``teacher.affordable``; cached answers are free).

    Plans are made from the nominal budget, so a resumed run generates the same inputs and
    finds their answers in the cache; cutting the plan to the cache plus the budget left lets
    a run whose lost requests were charged still finish instead of failing on its last batch."""
    fit = getattr(teacher, "affordable", None)
    if fit is None:
        return x, query_all(teacher, x, batch)
    outs, done = [], 0
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        k = fit(xb)
        if k:
            outs.append(teacher(xb[:k]))
            done += k
        if k < xb.shape[0]:
            break
    return x[:done], (torch.cat(outs) if outs else torch.zeros(0, teacher.num_classes or 0))


def _fresh_student(x, t, edge, *, G, num_classes, cfg, eval_data, progress, log, n_edge=0):
    """A new ``cfg.student`` (seeded by ``cfg.seed``) distilled on (x, t); returns (student, history)."""
    from fastkd import models

    torch.manual_seed(cfg.seed)
    kw = {"input_size": int(edge.shape[-1])} if ":" not in cfg.student else {}
    student = models.build(cfg.student, num_classes=num_classes, in_channels=edge.shape[1], **kw)
    hist = distill_student(student, x, t, G=G, cfg=cfg, eval_data=eval_data, progress=progress, log=log,
                           n_edge=n_edge)
    return student, hist


def _with_test_acc(out: dict, eval_data) -> dict:
    if eval_data is not None:
        out["test_acc"] = out["history"]["epochs"][-1]["test_acc"]
    return out


def run_mekd(teacher, edge: torch.Tensor, *, num_classes: int, cfg: MEKDConfig, eval_data=None,
             progress: bool = True, log=print) -> dict:
    """Deprivatization, transfer-set queries and distillation; returns a summary dict
    (``"student"`` and ``"generator"`` hold the models)."""
    t0 = time.perf_counter()
    budget = cfg.budget
    # 1. the edge images, answered once
    e, te = query_planned(teacher, _edge_subset(teacher, edge, budget), cfg.query_batch)
    # 2. deprivatization (its information term spends info_per_step per step)
    left = None if budget is None else budget - e.shape[0]
    steps_info = cfg.info_per_step * cfg.gan_steps
    if left is not None and steps_info > left // 2:
        cfg = MEKDConfig(**{**asdict(cfg), "info_per_step": max(0, (left // 2) // max(1, cfg.gan_steps))})
    G, xg, tg = deprivatize(teacher, edge, num_classes=num_classes, cfg=cfg, progress=progress, log=log)
    t_gan = time.perf_counter() - t0
    # 3. the rest of the budget buys images of the frozen G
    n_syn = (budget - e.shape[0] - xg.shape[0]) if budget is not None else 4 * edge.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    with torch.no_grad():
        xs = torch.cat([G(latent_prior(min(1024, n_syn - i), num_classes, gen))
                        for i in range(0, max(0, n_syn), 1024)]) if n_syn > 0 else edge[:0]
    xs, ts = query_planned(teacher, xs, cfg.query_batch)
    x = torch.cat([e, xg, xs])
    t = torch.cat([te, tg, ts])
    if progress:
        log(f"[mekd] transfer set: {e.shape[0]} edge + {xg.shape[0]} from deprivatization + "
            f"{xs.shape[0]} generated = {x.shape[0]} answered images")
    student, hist = _fresh_student(x, t, edge, G=G, num_classes=num_classes, cfg=cfg, eval_data=eval_data,
                                   progress=progress, log=log, n_edge=e.shape[0])
    return _with_test_acc({"method": "mekd", "config": asdict(cfg), "transfer_set": {"edge": int(e.shape[0]),
                           "deprivatization": int(xg.shape[0]), "generated": int(xs.shape[0])},
                           "history": hist, "seconds": time.perf_counter() - t0, "seconds_deprivatization": t_gan,
                           "student": student, "generator": G, "samples": xs[:64] if len(xs) else xg[:64],
                           "paid_check": (e[:4096], te[:4096].argmax(1))}, eval_data)


def run_kd(teacher, edge: torch.Tensor, *, num_classes: int, cfg: MEKDConfig, eval_data=None,
           augment: bool = True, progress: bool = True, log=print) -> dict:
    """Plain KD baseline on the same edge data and budget: the edge images, then randomly
    shifted/rotated copies of them until the budget is spent; Hinton loss only."""
    t0 = time.perf_counter()
    e = _edge_subset(teacher, edge, cfg.budget)
    xs = [e]
    if augment and cfg.budget is not None and cfg.budget > e.shape[0]:
        extra = cfg.budget - e.shape[0]
        g = torch.Generator().manual_seed(cfg.seed + 5)
        idx = torch.randint(0, edge.shape[0], (extra,), generator=g)
        xs.append(_jitter(edge[idx], g))
    x, t = query_planned(teacher, torch.cat(xs), cfg.query_batch)
    student, hist = _fresh_student(x, t, edge, G=None, num_classes=num_classes, cfg=cfg, eval_data=eval_data,
                                   progress=progress, log=log, n_edge=e.shape[0])
    return _with_test_acc({"method": "kd", "config": asdict(cfg), "transfer_set": {"edge": int(e.shape[0]),
                           "augmented": int(x.shape[0] - e.shape[0])}, "history": hist,
                           "seconds": time.perf_counter() - t0, "student": student}, eval_data)


def run_noise(teacher, edge: torch.Tensor, *, num_classes: int, cfg: MEKDConfig, eval_data=None,
              progress: bool = True, log=print) -> dict:
    """The no-skill baseline (GUIDE.md): the whole budget on N(0, I) images, Hinton loss only."""
    t0 = time.perf_counter()
    from .baselines import noise_inputs

    x = noise_inputs(cfg.budget or edge.shape[0], edge.shape[1:], seed=cfg.seed + 7)
    x, t = query_planned(teacher, x, cfg.query_batch)
    student, hist = _fresh_student(x, t, edge, G=None, num_classes=num_classes, cfg=cfg, eval_data=eval_data,
                                   progress=progress, log=log)
    return _with_test_acc({"method": "noise", "config": asdict(cfg), "transfer_set": {"noise": int(x.shape[0])},
                           "history": hist, "seconds": time.perf_counter() - t0, "student": student}, eval_data)


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation (+-15 degrees) and translation (+-1.5 px at 16 px) of each image."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(15)
    sh = (torch.rand(n, 2, generator=g) * 2 - 1) * (3.0 / x.shape[-1])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = ang.cos(), -ang.sin(), ang.sin(), ang.cos()
    theta[:, :, 2] = sh
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return (F.grid_sample(x - bg, grid, align_corners=False) + bg).contiguous()


# ----------------------------------------------------------------------------- bundled default
def digits_teacher(**_):
    """The bundled digits teacher (``fastkd.teachers.digits_teacher``): ``(model, info)`` with
    ``info["input_shape"]`` and ``info["num_classes"]``."""
    from fastkd.teachers import digits_teacher as _bundled

    model, info = _bundled()
    info = dict(info)
    info["input_shape"] = tuple(info.get("input_shape") or (1, 16, 16))
    info["num_classes"] = int(info.get("num_classes") or 10)
    return model.eval(), info


def digits_edge(*, shift: str = "none", size: int | None = None, seed: int = 0, fraction: float = 1.0):
    """``(edge_images, (x_test, y_test))``: the unlabeled edge data is the digits train split
    (disjoint from the test split; ``fraction`` keeps a part of it), optionally shifted:
    ``"rotate"`` (+-30 degrees), ``"noise"`` (std 0.5) or ``"rotate+noise"``."""
    from fastkd import data

    if size is None:  # the bundled teacher's input size
        size = int(digits_teacher()[1]["input_shape"][-1])
    x_tr, _, x_te, y_te = data.digits(size)
    return _edge_from(x_tr, (x_te, y_te), shift=shift, seed=seed, fraction=fraction)


def _edge_from(x_tr, test, *, shift: str, seed: int, fraction: float):
    """Keep ``fraction`` of the training images (seeded) and apply the shift."""
    if fraction < 1.0:
        g = torch.Generator().manual_seed(1000 + seed)
        x_tr = x_tr[torch.randperm(x_tr.shape[0], generator=g)[:max(1, int(round(fraction * x_tr.shape[0])))]]
    if shift not in ("none", "rotate", "noise", "rotate+noise"):
        raise ValueError(f"shift must be 'none', 'rotate', 'noise' or 'rotate+noise', got {shift!r}")
    rot = 30.0 if "rotate" in shift else 0.0
    noise = 0.5 if "noise" in shift else 0.0
    edge = shift_images(x_tr, rotate=rot, noise=noise, seed=seed) if shift != "none" else x_tr
    return edge, test


def fmnist_edge(*, shift: str = "none", size: int = 32, seed: int = 0, fraction: float = 1.0):
    """:func:`digits_edge` for Fashion-MNIST: the unlabelled training images (60,000; ``fraction``
    keeps a part) as edge data and the test split, at ``size`` (32: the paper's fmnist-32)."""
    from fastkd import data

    x_tr, _, x_te, y_te = data.fmnist(size)
    return _edge_from(x_tr, (x_te, y_te), shift=shift, seed=seed, fraction=fraction)


def _edge_data(name: str, **kw):
    return fmnist_edge(**kw) if name == "fmnist" else digits_edge(**kw)


def _edge_and_eval(args, shape, num_classes: int):
    """``(edge images, eval data or None)`` of --edge-data / --eval-data, checked against the
    served model's input shape and classes before any paid query."""
    from fastkd import data
    from fastkd._run import UsageError

    from ._cli import load_eval

    src = args.edge_data
    if src in ("digits", "fmnist"):
        if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
            raise UsageError(f"--edge-data {src}: the bundled sets are 1-channel square images; the served model "
                             f"takes {','.join(map(str, shape))}")
        edge, test = _edge_data(src, shift=args.shift, seed=args.seed, fraction=args.edge_fraction, size=shape[-1])
        if args.eval_data is None:
            args.eval_data = src
        return edge, (test if args.eval_data == src else load_eval(args, shape, num_classes))
    x, _ = data.load_labelled(src, input_shape=shape, mean=args.mean, std=args.std, flag="--edge-data")
    edge, _ = _edge_from(x, None, shift=args.shift, seed=args.seed, fraction=args.edge_fraction)
    return edge, load_eval(args, shape, num_classes)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, title: str | None = None) -> bool:
    """PNG grid of up to nrow x nrow images; returns False (and writes nothing) when there are none."""
    from fastkd.viz import save_image_grid

    return save_image_grid(images[: nrow * nrow], path, ncols=nrow, title=title, cell=0.9, dpi=100) is not None


# ----------------------------------------------------------------------------- CLI
def _common_args(p: argparse.ArgumentParser) -> None:
    d = MEKDConfig()
    p.add_argument("--method", default=METHOD, help=argparse.SUPPRESS)
    p.add_argument("--response", choices=["soft", "hard"], default=d.response,
                   help="what the teacher answers: probabilities or the top-1 label (default: %(default)s)")
    p.add_argument("--budget", type=int, default=d.budget, help="maximum paid teacher queries (default: %(default)s)")
    p.add_argument("--edge-data", default="digits", metavar="PATH|digits|fmnist",
                   help="your unlabelled local images (an image folder, an .npz or a .pt file; labels, if any, are "
                        "ignored), or the bundled digits / Fashion-MNIST training split (default: %(default)s)")
    p.add_argument("--shift", default="none", choices=["none", "rotate", "noise", "rotate+noise"],
                   help="distribution gap of the edge data against the teacher's data (default: %(default)s)")
    p.add_argument("--edge-fraction", type=float, default=1.0,
                   help="part of the edge data used (default: all of it)")
    p.add_argument("--tau", type=float, default=d.tau, help="temperature (default: %(default)s)")
    p.add_argument("--w-img", type=float, default=d.w_img, help="weight of the image-matching term (default: %(default)s)")
    p.add_argument("--w-kl", type=float, default=d.w_kl, help="weight of the tau^2 KL term (default: %(default)s)")
    p.add_argument("--metric", default=d.metric,
                   help="image distance: l1 (paired, default), l2, wasserstein-exact, wasserstein-sinkhorn, "
                        "wasserstein-sliced")
    p.add_argument("--gan-steps", type=int, default=d.gan_steps, help="deprivatization steps (default: %(default)s)")
    p.add_argument("--info-per-step", type=int, default=d.info_per_step,
                   help="teacher queries per deprivatization step for the information term (default: %(default)s)")
    p.add_argument("--w-info", type=float, default=d.w_info, help="weight of the information term (default: %(default)s)")
    p.add_argument("--confidence", choices=["latent", "max"], default=d.confidence,
                   help="information-term weight: the teacher's probability of the latent's class, or its top "
                        "probability (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="student epochs over the transfer set (default: %(default)s)")
    p.add_argument("--student", default=d.student, metavar="ARCH",
                   help="student model: a fastkd model name, torchvision:NAME, timm:NAME or package.module:factory "
                        "(default: %(default)s)")
    p.add_argument("--student-lr", "--lr", dest="lr", type=float, default=d.lr,
                   help="student SGD learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default: %(default)s)")
    p.add_argument("--cache", help="SQLite answer cache + budget ledger (reruns and resumes never pay twice)")
    p.add_argument("--max-batch", type=int, default=256, help="samples per teacher request (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per teacher request (default: %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="retries per request (default: %(default)s)")
    p.add_argument("--header", action="append", type=_header, default=[], metavar="'NAME: VALUE'",
                   help="extra HTTP header on every teacher request, e.g. 'Authorization: Bearer TOKEN' "
                        "(repeatable)")
    p.add_argument("--baseline", action="store_true", help="also train plain KD on the same edge data and budget")
    from ._cli import add_eval_args

    add_eval_args(p)
    p.add_argument("--out", default="fastkd_out/mekd", help="output folder (default: %(default)s); a finished run's "
                   "folder is refused without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _check_args(p, args) -> None:
    """One line naming the flag for a value that cannot work, before any query."""
    from ._cli import check_eval_args, positive

    positive(p, args, "budget", "gan_steps", "epochs", "max_batch")
    if args.info_per_step < 0 or args.retries < 0:
        p.error(f"--{'info-per-step' if args.info_per_step < 0 else 'retries'} must be >= 0")
    if not 0.0 < args.edge_fraction <= 1.0:
        p.error(f"--edge-fraction must be in (0, 1], got {args.edge_fraction:g}")
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if not args.lr > 0:
        p.error(f"--student-lr must be > 0, got {args.lr:g}")
    check_eval_args(p, args)


def _cfg(args) -> MEKDConfig:
    return MEKDConfig(budget=args.budget, response=args.response, tau=args.tau, w_img=args.w_img, w_kl=args.w_kl,
                      metric=args.metric, gan_steps=args.gan_steps, info_per_step=args.info_per_step,
                      w_info=args.w_info, confidence=args.confidence, epochs=args.epochs, student=args.student,
                      lr=args.lr, seed=args.seed, query_batch=args.max_batch)


def _log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def _header(s: str):
    import argparse
    name, sep, value = s.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n") or any(c in value for c in "\r\n"):
        raise argparse.ArgumentTypeError(f"must look like 'Name: value', got {s!r}")
    return name.strip(), value.strip()


def _served_shapes(meta: dict, num_classes: int | None = None):
    """(input shape of one sample, number of classes) from the server's model metadata: the
    width of a probability output, or the ``num_classes`` parameter a label-only server
    states; ``num_classes`` (--num-classes) when the server says neither."""
    from fastkd._run import UsageError

    try:
        shape = tuple(int(v) for v in meta["inputs"][0]["shape"][1:])
    except (KeyError, IndexError, TypeError, ValueError):
        raise UsageError("--teacher-url: the server's model metadata does not give a fixed input shape "
                         "[-1, C, H, W]") from None
    said = None
    for o in meta.get("outputs") or []:
        shp = o.get("shape") or []
        if str(o.get("datatype", "")).startswith("FP") and shp and isinstance(shp[-1], int) and shp[-1] > 1:
            said = int(shp[-1])
        said = said or (o.get("parameters") or {}).get("num_classes")
    said = said or (meta.get("parameters") or {}).get("num_classes")
    if said is not None and num_classes is not None and int(said) != num_classes:
        raise UsageError(f"--num-classes {num_classes} differs from the served model's {said} classes")
    k = int(said) if said is not None else num_classes
    if k is None:
        raise UsageError("--num-classes is required: the server answers labels and its metadata does not say how "
                         "many classes there are")
    if k < 2 or any(v < 1 for v in shape):
        raise UsageError(f"--teacher-url: the served model's shapes are unusable (input {shape}, {k} classes)")
    return shape, k


def _check_student(args, num_classes: int, shape) -> None:
    """The student must be buildable for the served inputs before any paid query."""
    from ._cli import build_student

    build_student(args, num_classes, shape)


def _run(args, url: str, model_name: str | None, ident: str) -> dict:
    from fastkd.blackbox import BlackBoxTeacher

    headers = dict(getattr(args, "header", None) or [])
    probe = BlackBoxTeacher(url=url, model_name=model_name, timeout=args.timeout, retries=args.retries,
                            headers=headers)
    meta = probe.metadata()
    probe.close()
    shape, num_classes = _served_shapes(meta, getattr(args, "num_classes", None))
    edge, test = _edge_and_eval(args, shape, num_classes)
    cfg = _cfg(args)
    _check_student(args, num_classes, shape)
    from fastkd import _run as _record

    _record.claim_out_dir(args.out, args.overwrite)  # before any paid query
    rows, results = [], {}
    todo = [("mekd", run_mekd)] + ([("kd", run_kd)] if args.baseline else [])
    for name, fn in todo:
        cache = args.cache
        if cache and len(todo) > 1:
            cache = f"{os.path.splitext(cache)[0]}.{name}.sqlite"
        teacher = BlackBoxTeacher(url=url, model_name=model_name, response=args.response, budget=args.budget,
                                  max_batch=args.max_batch, timeout=args.timeout, retries=args.retries,
                                  headers=headers,
                                  cache=cache, name=f"{ident}:{name}:{args.shift}:{args.seed}" if not cache else None,
                                  verbose=not args.quiet)
        res = fn(teacher, edge, num_classes=num_classes, cfg=cfg, eval_data=test, progress=not args.quiet, log=_log)
        st = teacher.stats()
        teacher.close()
        res["queries"] = st
        results[name] = res
        rows.append((name, res.get("test_acc"), st["queries_paid_total"], st["bytes_sent"], st["bytes_received"],
                     res["seconds"]))
    from fastkd.teachers import save_teacher

    from ._cli import finish

    if "kd" in results:  # the baseline's student, loadable the same way
        save_teacher(results["kd"]["student"], os.path.join(args.out, "student_kd.pt"), name=args.student,
                     num_classes=num_classes, in_channels=shape[0], input_shape=shape,
                     kwargs={"input_size": shape[-1]} if ":" not in args.student else {})
    wrote_grid = "generator" in results.get("mekd", {}) and save_grid(
        results["mekd"]["samples"], os.path.join(args.out, "samples.png"),
        title=f"MEKD generator samples ({args.response} responses, shift={args.shift})")
    summary = {"teacher_url": url, "response": args.response, "budget": args.budget, "shift": args.shift,
               "edge_data": args.edge_data, "eval_data": args.eval_data, "seed": args.seed, "config": asdict(cfg),
               "results": {k: {kk: vv for kk, vv in v.items() if kk not in ("student", "generator", "samples",
                                                                                "paid_check")}
                           for k, v in results.items()}}
    print(f"{'method':<6} {'test acc':>9} {'queries':>8} {'MB sent':>8} {'MB recv':>8} {'time s':>7}")
    for name, acc, q, bs, br, sec in rows:
        acc_s = "n/a" if acc is None else f"{100 * acc:.2f}%"
        print(f"{name:<6} {acc_s:>9} {q:>8d} {bs / 1e6:>8.2f} {br / 1e6:>8.2f} {sec:>7.0f}")
    print(f"budget {args.budget}, response {args.response}, shift {args.shift}, seed {args.seed}; "
          f"summary: {os.path.join(args.out, 'summary.json')}"
          + (f", samples: {os.path.join(args.out, 'samples.png')}" if wrote_grid else ""))
    x_chk, t_chk = results["mekd"]["paid_check"]
    finish(args, method=METHOD, student=results["mekd"]["student"], teacher=None, shape=shape,
           num_classes=num_classes, check_x=x_chk, what="the edge images (against the teacher's paid answers)",
           summary=summary, normalize=None if args.mean is None else {"mean": args.mean, "std": args.std},
           log=_log, smoke=getattr(args, "quick", False), teacher_labels=t_chk)
    return summary


def cli_distill(argv) -> int:
    p = _Parser(
        prog="fastkd distill --method mekd",
        description="MEKD black-box distillation of a teacher served with the Open Inference Protocol "
                    "(e.g. `fastkd serve-teacher digits --port 8000`): the input shape and classes come from the "
                    "server's metadata, the unlabelled local images from --edge-data (default: the digits train "
                    "split, evaluated on its test split).")
    p.add_argument("--teacher-url", required=True,
                   help="http://HOST:PORT/v2/models/NAME (or http://HOST:PORT with --model-name)")
    p.add_argument("--num-classes", type=int, help="number of classes, when the server answers labels and its "
                   "metadata does not say")
    p.add_argument("--model-name", help="served model name when not in the URL")
    _common_args(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    _run(args, args.teacher_url, args.model_name, args.teacher_url)
    return 0


def cli_demo(argv) -> int:
    p = _Parser(
        prog="fastkd demo --method mekd",
        description="Start a local Open Inference Protocol server (127.0.0.1) with the digits teacher, "
                    "run MEKD (and plain KD) against it within the query budget, print a table with the "
                    "queries and bytes used, write a JSON summary and a sample grid.")
    _common_args(p)
    p.set_defaults(baseline=True)
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the plain-KD baseline")
    p.add_argument("--quick", action="store_true", help="a tiny budget (a smoke test of the whole pipeline: a "
                   "student that learned nothing is only a warning)")
    p.set_defaults(overwrite=True)  # the demo replaces its own previous results
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--data", choices=["digits", "fmnist"], default="digits",
                   help="digits (bundled) or fmnist: the bundled Fashion-MNIST LeNet-5 behind the server, the "
                        "unlabelled 32x32 training images as edge data, student lenet5_half (needs apt-get "
                        "install dataset-fashion-mnist)")
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.quick:  # tiny values for whatever was not given explicitly
        d = MEKDConfig()
        for k, v, default in (("budget", 140, d.budget), ("gan_steps", 2, d.gan_steps), ("epochs", 1, d.epochs),
                              ("edge_fraction", 0.04, 1.0)):
            if getattr(args, k) == default:
                setattr(args, k, v)
    if args.edge_data == "digits":
        args.edge_data = args.data
    from fastkd.distill import evaluate
    from fastkd.serve import ServerThread, create_app

    if args.data == "fmnist":
        from fastkd import data as _data
        from fastkd.teachers import fmnist_teacher

        try:
            _data.fmnist_info(32)
        except FileNotFoundError as e:
            p.error(str(e))
        model, info = fmnist_teacher("fmnist")
        if args.student == MEKDConfig().student:
            args.student = "lenet5_half"
    else:
        model, info = digits_teacher()
    name = args.data
    _, test = _edge_data(args.data, seed=args.seed, size=int(info["input_shape"][-1]))
    acc_t = evaluate(model, test)
    app = create_app(model, input_shape=tuple(info["input_shape"]), num_classes=info["num_classes"], name=name,
                     response=args.response)
    with ServerThread(app, port=args.port or None) as srv:
        url = f"{srv.url}/v2/models/{name}"
        _log(f"[mekd] teacher ({100 * acc_t:.2f}% on the test split) served at {url} ({args.response} responses)")
        summary = _run(args, url, None, url)
        summary["teacher_accuracy"] = acc_t
        summary["server_answered"] = app.state.stats["inference_count"]
    print(f"teacher {100 * acc_t:.2f}% on the test split; the server answered {summary['server_answered']} "
          f"queries in all")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return 0
