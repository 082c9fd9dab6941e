import json
import os

import pytest
import torch
from torch import nn

import fastkd
from fastkd import models, synthesis
from fastkd.synthesis import ShardMismatchError, SyntheticDataset, cake, lake
import fastkd.synthesis.cake_synthesis as cake_mod
from fastkd.synthesis.reference import authors_loop

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return models.create("cnn", num_classes=10, in_channels=1, width=0.25).eval()


def kw(**over):
    d = dict(num_classes=10, input_shape=SHAPE, num_samples=30, batch_size=10, steps=3, lr=(1e-2, 1e-3),
             progress=False)
    d.update(over)
    return d


def test_cake_output_and_labels(teacher):
    ds = cake(teacher, **kw(num_samples=25))
    assert isinstance(ds, SyntheticDataset) and len(ds) == 25
    assert ds.inputs.shape == (25, *SHAPE) and ds.probs.shape == (25, 10)
    assert torch.allclose(ds.probs.sum(1), torch.ones(25), atol=1e-5)
    # every full group of 10 holds each class once
    for g in range(2):
        assert sorted(ds.labels[10 * g:10 * (g + 1)].tolist()) == list(range(10))
    assert len(set(ds.labels[20:].tolist())) == 5
    assert ds.meta["method"] == "cake" and ds.meta["throughput_sample_steps_per_s"] > 0
    # teacher state restored
    assert all(p.requires_grad for p in teacher.parameters())


def test_same_seed_same_data_other_seed_other_data(teacher):
    a = cake(teacher, **kw(seed=3))
    b = cake(teacher, **kw(seed=3))
    c = cake(teacher, **kw(seed=4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_synthesis_moves_towards_labels():
    torch.manual_seed(0)
    t = models.create("mlp", num_classes=10, in_channels=1, input_size=8).eval()
    ds = cake(t, **kw(num_samples=40, steps=40, lr=(0.05, 0.05), w_tv=0.0))
    assert ds.teacher_agreement() > 0.9


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("cpp", marks=pytest.mark.skipif(not fastkd.backends()["cpp"].available,
                                                          reason="fastkd._C (cpp backend) is not built"))])
def test_cake_matches_authors_loop(teacher, backend):
    """Same objective, same start: the fused loop and the eager authors' loop agree."""
    a = cake(teacher, backend=backend, **kw())
    b = authors_loop(teacher, **{k: v for k, v in kw().items() if k != "progress"})
    assert torch.allclose(a.inputs, b.inputs, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.labels, b.labels)


def test_lake_adds_noise(teacher):
    a = cake(teacher, **kw())
    b = lake(teacher, **kw())
    assert b.meta["method"] == "lake"
    d = (a.inputs - b.inputs).std().item()
    assert d > 0.5 * (2 * 1e-3) ** 0.5  # at least the smallest step's noise scale
    c = cake(teacher, langevin=True, noise_std=0.0, **kw())
    assert torch.allclose(a.inputs, c.inputs, atol=1e-6)


def test_priors(teacher):
    u = cake(teacher, prior="uniform", **kw(steps=1, lr=(1e-6, 1e-6), w_tv=0.0))
    assert u.inputs.abs().max() <= 1.0 + 1e-3
    calls = []

    def prior(shape, gen):
        calls.append(shape)
        return torch.full(shape, 0.25)

    p = cake(teacher, prior=prior, **kw(steps=1, lr=(1e-9, 1e-9), w_tv=0.0))
    assert calls[0] == (10, *SHAPE) and torch.allclose(p.inputs, torch.full_like(p.inputs, 0.25), atol=1e-4)
    with pytest.raises(ValueError, match="prior callable must return"):
        cake(teacher, prior=lambda s, g: torch.zeros(3), **kw())


def test_lr_schedule():
    lr = synthesis.step_sizes(5, 1e-1, 1e-5, "loglinear")
    assert lr[0] == pytest.approx(1e-1) and lr[-1] == pytest.approx(1e-5) and lr[2] == pytest.approx(1e-3)
    cos = synthesis.step_sizes(5, 1e-1, 1e-5, "cosine")
    assert cos[0] == pytest.approx(1e-1) and cos[-1] == pytest.approx(1e-5) and cos[1] > lr[1]


def test_bn_prior():
    torch.manual_seed(0)
    bn_teacher = models.create("cnn", num_classes=10, in_channels=1, width=0.25, batch_norm=True).eval()
    a = cake(bn_teacher, **kw(bn_prior_weight=0.0))
    b = cake(bn_teacher, **kw(bn_prior_weight=10.0))
    assert not torch.allclose(a.inputs, b.inputs)
    hooks = [m._forward_hooks for m in bn_teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(len(h) == 0 for h in hooks)  # hooks removed
    plain = models.create("cnn", num_classes=10, in_channels=1, width=0.25).eval()
    with pytest.raises(ValueError, match="BatchNorm"):
        cake(plain, **kw(bn_prior_weight=1.0))


def test_save_load_roundtrip(teacher, tmp_path):
    ds = cake(teacher, **kw())
    p = ds.save(str(tmp_path / "d.pt"))
    back = SyntheticDataset.load(p)
    assert torch.equal(back.inputs, ds.inputs) and torch.equal(back.probs, ds.probs)
    assert back.meta["steps"] == 3
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastkd synthetic"):
        SyntheticDataset.load(str(tmp_path / "other.pt"))


def test_out_dir_resume_redoes_only_missing(teacher, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    full = cake(teacher, **kw(num_samples=40))
    real_write = cake_mod._write_shard
    written = []

    def crash_after_two(out_dir, b, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_write(out_dir, b, *a, **k)
        written.append(b)

    monkeypatch.setattr(cake_mod, "_write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        cake(teacher, **kw(num_samples=40, out_dir=out))
    assert sorted(f for f in os.listdir(out) if f.startswith("batch_")) == ["batch_000000.pt", "batch_000001.pt"]
    monkeypatch.setattr(cake_mod, "_write_shard", real_write)
    again = []
    monkeypatch.setattr(cake_mod, "_write_shard", lambda d, b, *a, **k: (again.append(b), real_write(d, b, *a, **k)))
    ds = cake(teacher, **kw(num_samples=40, out_dir=out))
    assert again == [2, 3]  # only the batches not finished before
    assert ds.meta["resumed_batches"] == 2
    assert torch.allclose(ds.inputs, full.inputs) and torch.equal(ds.labels, full.labels)
    assert torch.equal(SyntheticDataset.load(out).inputs, ds.inputs)


def test_out_dir_torn_shard_is_redone(teacher, tmp_path):
    out = str(tmp_path / "run")
    ds = cake(teacher, **kw(out_dir=out))
    with open(os.path.join(out, "batch_000001.pt"), "wb") as f:
        f.write(b"torn")
    ds2 = cake(teacher, **kw(out_dir=out))
    assert ds2.meta["resumed_batches"] == 2 and torch.allclose(ds.inputs, ds2.inputs)


def test_out_dir_of_another_run_is_refused(teacher, tmp_path):
    out = str(tmp_path / "run")
    cake(teacher, **kw(out_dir=out))
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    with pytest.raises(ShardMismatchError, match="another run.*steps"):
        cake(teacher, **kw(out_dir=out, steps=4))
    torch.manual_seed(1)
    other = models.create("cnn", num_classes=10, in_channels=1, width=0.25).eval()
    with pytest.raises(ShardMismatchError, match="another run.*teacher"):
        cake(other, **kw(out_dir=out))
    after = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert before == after  # nothing written or lost
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "batch_000000.pt").write_bytes(b"x")
    with pytest.raises(ShardMismatchError, match="no manifest.json"):
        cake(teacher, **kw(out_dir=str(stray)))


class _Wide(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :7] * 2


class _NaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)) * float("nan")


def test_bad_inputs(teacher, tmp_path):
    with pytest.raises(ValueError, match="output width is 7 but num_classes is 10"):
        cake(_Wide(), **kw())
    with pytest.raises(ValueError, match=r"rejects inputs of input_shape \(3, 8, 8\)"):
        cake(teacher, **kw(input_shape=(3, 8, 8)))
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        cake(_NaN(), **kw(out_dir=out))
    assert not [f for f in os.listdir(out) if f.startswith("batch_")]
    with pytest.raises(ValueError, match="num_samples"):
        cake(teacher, **kw(num_samples=0))
    with pytest.raises(ValueError, match="lr must be"):
        cake(teacher, **kw(lr=(0.1, -1.0)))
    with pytest.raises(ValueError, match="schedule"):
        cake(teacher, **kw(schedule="linear"))
    with pytest.raises(ValueError, match="w_tv"):
        cake(teacher, **kw(w_tv=-1.0))
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        cake(lambda x: x, **kw())
    with pytest.raises(ValueError, match="TV prior"):
        cake(nn.Linear(5, 10), **kw(input_shape=(5,)))


def test_diverging_batch_keeps_written_shards(tmp_path):
    class GoesBad(nn.Module):
        """Fine for the probe and the first batch, NaN from the second batch's last step on."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.lin(x.flatten(1))
            return out * float("nan") if self.calls >= 8 else out

    torch.manual_seed(0)
    out = str(tmp_path / "x")
    with pytest.raises(FloatingPointError, match="batch 1"):
        cake(GoesBad(), **kw(out_dir=out, w_tv=0.0))
    assert sorted(f for f in os.listdir(out) if f.startswith("batch_")) == ["batch_000000.pt"]
    assert json.load(open(os.path.join(out, "manifest.json")))["num_batches"] == 3
