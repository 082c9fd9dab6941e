"""MEKD method: generator, deprivatization, distillation and the CLI, on tiny configurations."""
import json
import os

import pytest
import torch

from fastkd.blackbox import BlackBoxTeacher, QueryBudgetExceeded
from fastkd.methods import mekd

pytest.importorskip("fastkd.data")


class Counting:
    def __init__(self, model):
        self.model, self.n = model, 0

    def __call__(self, x):
        assert not x.requires_grad
        self.n += x.shape[0]
        return self.model(x)


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


def tiny_cfg(**kw):
    base = dict(budget=300, gan_steps=4, gan_batch=16, info_per_step=3, epochs=1, batch_size=64, ngf=8, ndf=4,
                query_batch=64)
    base.update(kw)
    return mekd.MEKDConfig(**base)


def test_generator_shapes_range_and_centring():
    g = mekd.Generator(10, (1, 8, 8), ngf=8, lo=-0.5, hi=2.0).eval()
    v = torch.randn(5, 10)
    x = g(v)
    assert x.shape == (5, 1, 8, 8) and x.min() >= -0.5 and x.max() <= 2.0
    torch.testing.assert_close(g(v + 3.0), x)  # scores are centred: softmax-invariant shifts do nothing
    with pytest.raises(ValueError, match="divisible by 4"):
        mekd.Generator(10, (1, 10, 10))


def test_teacher_scores_and_shift():
    p = torch.softmax(torch.randn(4, 10), 1)
    torch.testing.assert_close(torch.softmax(mekd.teacher_scores(p, "soft"), 1), p)
    oh = torch.eye(10)[:4]
    assert torch.equal(mekd.teacher_scores(oh, "hard"), oh)
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(mekd.shift_images(x), x)
    y1, y2 = (mekd.shift_images(x, rotate=30, noise=0.5, seed=s) for s in (1, 1))
    assert torch.equal(y1, y2) and not torch.equal(y1, x)


@pytest.mark.parametrize("response", ["soft", "hard"])
def test_run_mekd_spends_exactly_the_budget(response):
    f = Counting(tiny_teacher())
    bb = BlackBoxTeacher(f, response=response, budget=300)
    edge = torch.randn(50, 1, 8, 8)
    test = (torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    cfg = tiny_cfg(response=response)
    r = mekd.run_mekd(bb, edge, num_classes=10, cfg=cfg, eval_data=test, progress=False)
    ts = r["transfer_set"]
    assert ts == {"edge": 50, "deprivatization": 12, "generated": 238}
    assert f.n == 300 and bb.stats()["queries_paid_total"] == 300
    assert 0.0 <= r["test_acc"] <= 1.0
    assert not any(p.requires_grad for p in r["generator"].parameters())
    with pytest.raises(QueryBudgetExceeded):
        bb(torch.randn(1, 1, 8, 8))


def test_run_kd_baseline_same_budget():
    f = Counting(tiny_teacher())
    bb = BlackBoxTeacher(f, response="soft", budget=200)
    edge = torch.randn(30, 1, 8, 8)
    r = mekd.run_kd(bb, edge, num_classes=10, cfg=tiny_cfg(budget=200), progress=False)
    assert r["transfer_set"] == {"edge": 30, "augmented": 170} and f.n == 200


def test_distill_loss_uses_generator_images():
    """With w_kl = 0 only the image term trains the student: it must move the student."""
    g = mekd.Generator(10, (1, 8, 8), ngf=8).eval()
    for p in g.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.randn(64, 1, 8, 8)
    t = torch.softmax(3 * torch.randn(64, 10), 1)
    before = [p.clone() for p in student.parameters()]
    cfg = tiny_cfg(w_kl=0.0, epochs=2)
    h = mekd.distill_student(student, x, t, G=g, cfg=cfg, progress=False)
    assert h["epochs"][-1]["img_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_cli_distill_against_served_teacher(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    from fastkd.serve import ServerThread, create_app

    m = tiny_teacher()
    app = create_app(m, input_shape=[1, 8, 8], num_classes=10, name="digits", response="hard")
    from fastkd.distill import StudentCollapsedError

    argv = ["--method", "mekd", "--teacher-url", "http://unset",
            "--response", "hard", "--budget", "150", "--gan-steps", "3", "--epochs", "1", "--edge-fraction", "0.04",
            "--out", str(tmp_path), "--quiet", "--cache", str(tmp_path / "c.sqlite")]
    with ServerThread(app) as srv:
        argv[3] = f"{srv.url}/v2/models/digits"
        # 150 label answers and one epoch teach the student nothing: the run stops with that
        # error (its files are written), it does not report success
        with pytest.raises(StudentCollapsedError, match="learned nothing"):
            mekd.cli_distill(argv)
        served = app.state.stats["inference_count"]
        # the classes came from the metadata of a label-only server (num_classes parameter)
        s = json.loads((tmp_path / "summary.json").read_text())
        assert s["status"].startswith("failed") and s["config"]["budget"] == 150
        q = s["results"]["mekd"]["queries"]
        assert q["queries_paid_total"] <= 150 and served == q["queries_paid_total"]
        assert os.path.exists(tmp_path / "samples.png") and os.path.exists(tmp_path / "student.pt")
        # a finished run's folder is refused before any paid query
        with pytest.raises(ValueError, match="--overwrite"):
            mekd.cli_distill(argv)
        assert app.state.stats["inference_count"] == served
    out = capsys.readouterr().out
    assert "mekd" in out and "queries" in out


def test_cli_demo_tiny(tmp_path, monkeypatch, capsys):
    pytest.importorskip("uvicorn")
    monkeypatch.setattr(mekd, "digits_teacher",
                        lambda **kw: (tiny_teacher(), {"num_classes": 10, "input_shape": (1, 8, 8)}))
    rc = mekd.cli_demo(["--method", "mekd", "--quick", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["results"]) == {"mekd", "kd"}
    assert s["server_answered"] <= 2 * 140
    for r in s["results"].values():
        assert r["queries"]["queries_paid_total"] <= 140 and r["queries"]["bytes_sent"] > 0
    assert "teacher" in capsys.readouterr().out
