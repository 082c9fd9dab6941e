"""TA-DFKD method: tiny configurations only (the full recipe is in benchmarks/)."""
import json
import os

import pytest
import torch
from torch import nn

from fastkd import models
from fastkd.methods import tadfkd
from fastkd.methods.tadfkd import Generator, TADFKDConfig, distill, noise_baseline, selection_scores

TINY = dict(iterations=2, student_steps=2, batch_size=8, nz=8, ngf=4, eval_every=1)


def _teacher(name="cnn_bn"):
    torch.manual_seed(0)
    t = models.create(name, num_classes=10, in_channels=1)
    t.train()
    with torch.no_grad():  # give the BN layers running statistics
        for _ in range(2):
            t(torch.randn(16, 1, 8, 8))
    return t.eval()


def _eval_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g)


@pytest.mark.parametrize("name", ["cnn_bn", "cnn_deep", "resnet8"])
def test_bn_teachers_forward(name):
    for size in (8, 16):
        t = models.create(name, num_classes=10, in_channels=1, input_size=size)
        assert t(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in t.modules())


def test_generator_shapes():
    g = Generator(nz=8, ngf=4, size=16, channels=3)
    x = g(torch.randn(5, 8))
    assert x.shape == (5, 3, 16, 16)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(size=10)


def test_selection_scores_range():
    s = selection_scores(torch.randn(32, 10) * 3)
    assert s.min() == 0 and s.max() == 1
    assert torch.isfinite(selection_scores(torch.zeros(4, 10))).all()   # all equal: no division by 0


@pytest.mark.parametrize("variant", [{}, {"class_prior_weight": 1.0}, {"select": False}])
def test_distill_tiny(variant):
    teacher = _teacher()
    student = models.create("cnn_half", num_classes=10, in_channels=1)
    before = [p.detach().clone() for p in student.parameters()]
    t_before = [p.detach().clone() for p in teacher.parameters()]
    res = distill(teacher, student, config=TADFKDConfig(**TINY, **variant), image_shape=(1, 8, 8),
                  eval_data=_eval_data(), progress=False)
    assert len(res["history"]) == 2 and 0.0 <= res["final_test_acc"] <= 1.0
    h = res["history"][-1]
    assert 0.0 < h["selected"] <= 1.0 and h["bn"] > 0
    if not variant.get("select", True):
        assert h["selected"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))   # teacher frozen
    # the hooks are removed afterwards
    assert all(len(m._forward_hooks) == 0 for m in teacher.modules())


def test_distill_is_deterministic():
    accs = []
    for _ in range(2):
        torch.manual_seed(3)
        student = models.create("cnn_half", num_classes=10, in_channels=1)
        res = distill(_teacher(), student, config=TADFKDConfig(**TINY), image_shape=(1, 8, 8), progress=False)
        accs.append([r["loss_s"] for r in res["history"]])
    assert accs[0] == accs[1]


def test_teacher_without_bn():
    teacher = models.create("cnn", num_classes=10, in_channels=1).eval()
    student = models.create("cnn_half", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        distill(teacher, student, config=TADFKDConfig(**TINY), image_shape=(1, 8, 8), progress=False)
    res = distill(teacher, student, config=TADFKDConfig(**TINY, bn_weight=0.0), image_shape=(1, 8, 8),
                  progress=False)
    assert res["history"][-1]["bn"] == 0.0


@pytest.mark.parametrize("kwargs,match", [({"iterations": 0}, "iterations must be"),
                                          ({"batch_size": 1}, "batch_size must be"),
                                          ({"lr_s": -1.0}, "lr_s must be"),
                                          ({"bn_weight": -1.0}, "bn_weight must be"),
                                          ({"threshold": 2.0}, "threshold must be")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TADFKDConfig(**kwargs).validate()


def test_noise_baseline_runs():
    student = models.create("cnn_half", num_classes=10, in_channels=1)
    acc = noise_baseline(_teacher(), student, config=TADFKDConfig(**TINY), image_shape=(1, 8, 8),
                         eval_data=_eval_data())
    assert 0.0 <= acc <= 1.0


def test_cli_distill_writes_summary_and_grid(tmp_path, monkeypatch):
    # A pre-cached (untrained) digits teacher: no teacher training in the test.
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(_teacher().state_dict(), cache / "digits_cnn_bn_s8_seed0.pt")
    monkeypatch.setenv("FASTKD_CACHE", str(cache))
    out = tmp_path / "run"
    rc = tadfkd.cli_distill(["--teacher", "digits:cnn_bn", "--input-shape", "1,8,8", "--out", str(out),
                             "--cache", str(cache), "--iterations", "2", "--student-steps", "2",
                             "--batch-size", "8", "--nz", "8", "--ngf", "4", "--quiet"])
    assert rc == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["method"] == "tadfkd" and summ["config"]["iterations"] == 2
    assert 0.0 <= summ["final_test_acc"] <= 1.0 and "generator" not in summ
    assert (out / "samples.png").stat().st_size > 1000
    assert os.path.exists(summ["student_path"])


def test_method_is_discovered():
    from fastkd.commands.methods import available_methods

    assert available_methods()["tadfkd"] == "tadfkd"
