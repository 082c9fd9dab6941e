"""The silhouette prior (objects on a black background): its draws, cake(prior="silhouette"),
the noise baseline drawn from it, and the CLI's check before any synthesis."""
import json

import pytest
import torch
import torch.nn.functional as F

from fastkd.cli import main
from fastkd.methods.baselines import noise_inputs
from fastkd.synthesis import cake, silhouette_prior

LO, HI = -0.66, 2.35
LO32, HI32 = float(torch.tensor(LO)), float(torch.tensor(HI))  # as float32 tensors hold them


def _spec(shape, gen, lo, hi, grid=4, margin=None):
    """The prior written out: a grid x grid N(0, 1) field upsampled into the image inside the
    margin, thresholded at U(-0.3, 0.3); inside it a per-channel level in the upper 70 % of the
    range plus N(0, ((hi - lo) / 6)^2) pixel noise; lo elsewhere; clamped to [lo, hi]."""
    n, c, h, w = shape
    m = round(min(h, w) / 16) if margin is None else margin
    z = F.interpolate(torch.randn((n, 1, grid, grid), generator=gen), size=(h - 2 * m, w - 2 * m),
                      mode="bicubic", align_corners=False)
    thr = torch.rand((n, 1, 1, 1), generator=gen) * 0.6 - 0.3
    level = lo + (hi - lo) * (0.3 + 0.7 * torch.rand((n, c, 1, 1), generator=gen))
    noise = (hi - lo) / 6 * torch.randn((n, c, h - 2 * m, w - 2 * m), generator=gen)
    out = torch.full(shape, lo)
    out[:, :, m:h - m, m:w - m] = torch.where(z > thr, level + noise, torch.full_like(noise, lo))
    return out.clamp(lo, hi)


@pytest.mark.parametrize("shape,margin", [((7, 1, 32, 32), None), ((5, 3, 20, 24), None), ((3, 2, 9, 9), 0),
                                          ((4, 1, 16, 16), 3)])
def test_silhouette_prior_matches_its_specification(shape, margin):
    draw = silhouette_prior(LO, HI, margin=margin)
    got = draw(shape, torch.Generator().manual_seed(3))
    want = _spec(shape, torch.Generator().manual_seed(3), LO, HI, margin=margin)
    assert got.shape == shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert float(got.min()) >= LO32 and float(got.max()) <= HI32
    m = round(min(shape[2:]) / 16) if margin is None else margin
    if m:
        assert torch.all(got[:, :, :m] == LO32) and torch.all(got[:, :, :, -m:] == LO32)  # the margin is background


def test_silhouette_prior_draws_objects_on_a_background():
    x = silhouette_prior(LO, HI)((200, 1, 32, 32), torch.Generator().manual_seed(0))
    inside = x[:, :, 2:30, 2:30]
    frac_bg = (inside == LO32).float().mean((1, 2, 3))
    # every image has both background and object; overall about half of each
    assert 0.2 < float(frac_bg.mean()) < 0.8
    assert float((frac_bg > 0.98).float().mean()) < 0.1 and float((frac_bg < 0.02).float().mean()) < 0.1
    obj = inside[inside > LO32]
    assert float(obj.mean()) > LO + 0.4 * (HI - LO)  # objects are brighter than the background
    # reproducible from the generator, different for another seed
    again = silhouette_prior(LO, HI)((200, 1, 32, 32), torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    assert not torch.equal(x, silhouette_prior(LO, HI)((200, 1, 32, 32), torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kw,msg", [(dict(lo=1.0, hi=1.0), "lo < hi"), (dict(lo=0.0, hi=1.0, grid=0), "grid"),
                                    (dict(lo=0.0, hi=1.0, margin=-1), "margin")])
def test_silhouette_prior_rejects_bad_arguments(kw, msg):
    lo, hi = kw.pop("lo"), kw.pop("hi")
    with pytest.raises(ValueError, match=msg):
        silhouette_prior(lo, hi, **kw)


def test_silhouette_prior_needs_images_and_room():
    draw = silhouette_prior(0.0, 1.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        draw((4, 10), torch.Generator())
    with pytest.raises(ValueError, match="margin"):
        silhouette_prior(0.0, 1.0, margin=4)((2, 1, 8, 8), torch.Generator())


def _teacher():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 16 * 16, 10)).eval()


def test_cake_silhouette_prior_needs_clamp_and_images():
    t = _teacher()
    with pytest.raises(ValueError, match=r"prior='silhouette'.*clamp"):
        cake(t, num_classes=10, input_shape=(1, 16, 16), num_samples=10, steps=1, progress=False,
             prior="silhouette")
    flat = torch.nn.Linear(8, 10)
    with pytest.raises(ValueError, match="prior='silhouette'"):
        cake(flat, num_classes=10, input_shape=(8,), num_samples=10, steps=1, w_tv=0.0, progress=False,
             prior="silhouette", clamp=(0.0, 1.0))
    with pytest.raises(ValueError, match="'silhouette'"):
        cake(t, num_classes=10, input_shape=(1, 16, 16), num_samples=10, steps=1, progress=False, prior="blobs")


def test_cake_with_the_silhouette_prior_starts_from_its_draws():
    t = _teacher()
    kw = dict(num_classes=10, input_shape=(1, 16, 16), num_samples=20, batch_size=10, progress=False,
              clamp=(LO, HI), lr=(1e-6, 1e-6), w_contr=0.0, w_tv=0.0)
    ds = cake(t, steps=1, prior="silhouette", **kw)
    assert ds.meta["prior"].startswith("silhouette(")
    # a negligible step leaves the prior's draw: black margins, background pixels at LO
    x = ds.inputs
    assert torch.allclose(x[:, :, :1], torch.full_like(x[:, :, :1], LO), atol=1e-3)
    assert float((x - LO).abs().lt(1e-3).float().mean()) > 0.3
    same = cake(t, steps=1, prior=silhouette_prior(LO, HI), **kw)
    torch.testing.assert_close(ds.inputs, same.inputs)
    normal = cake(t, steps=1, prior="normal", **kw)
    assert float((normal.inputs - LO).abs().lt(1e-3).float().mean()) < 0.3


def test_noise_inputs_from_the_silhouette_prior():
    x = noise_inputs(50, (1, 32, 32), seed=4, clamp=(LO, HI), prior="silhouette")
    torch.testing.assert_close(x, _spec((50, 1, 32, 32), torch.Generator().manual_seed(4), LO, HI))
    with pytest.raises(ValueError, match="clamp"):
        noise_inputs(5, (1, 32, 32), seed=0, prior="silhouette")
    # the default stays N(0, I)
    want = torch.randn((5, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(noise_inputs(5, (1, 4, 4), seed=2), want)


def test_distill_cli_prior_silhouette(tmp_path, capsys):
    common = ["distill", "--method", "cake", "--teacher", "digits", "--student", "cnn_half", "--num-samples", "20",
              "--batch-size", "10", "--steps", "1", "--epochs", "1", "--eval-digits", "--quiet", "--device", "cpu",
              "--prior", "silhouette", "--student-init", "teacher"]
    # no pixel range (no --clamp, no --mean/--std): one line naming the flag, exit 2, before any synthesis
    out = tmp_path / "bad"
    assert main(common + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prior silhouette" in err and "--clamp" in err and "Traceback" not in err
    assert not (out / "synthetic").exists()
    run = tmp_path / "run"
    assert main(common + ["--clamp", "-1", "2", "--out", str(run)]) == 0
    summary = json.load(open(run / "summary.json"))
    assert summary["config"]["prior"] == "silhouette"
    manifest = json.load(open(run / "synthetic" / "manifest.json"))
    assert manifest["config"]["prior"].startswith("silhouette(lo=-1, hi=2")
