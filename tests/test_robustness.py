"""Synthesis and training on teachers that are not well behaved: a run either finishes with
sane data or stops with an error naming the cause, never a "successful" NaN student."""
import pytest
import torch
from torch import nn

from fastkd import data, distill, models
from fastkd.distill import StudentCollapsedError, check_student, train_student
from fastkd.synthesis import cake


class Scaled(nn.Module):
    """A teacher whose logits are ``k`` times the wrapped model's: a steep loss."""

    def __init__(self, m, k):
        super().__init__()
        self.m, self.k = m, k

    def forward(self, x):
        return self.m(x) * self.k


@pytest.fixture(scope="module")
def mlp_teacher():
    """A plain MLP (64-256-256-10, ReLU, no normalisation layer) trained on the digits."""
    torch.manual_seed(0)
    m = models.create("mlp", num_classes=10, in_channels=1, input_size=8, hidden=(256, 256))
    m, h = distill.train_teacher(m, data=data.digits(8), size=8, epochs=8, progress=False)
    assert h.final_accuracy > 0.9
    return m.eval()


@pytest.mark.parametrize("k", [1.0, 100.0])
def test_cake_survives_steep_teachers(mlp_teacher, k):
    """At the default step sizes the first batches of a steep teacher run away (the contrastive
    term is a quadratic whose curvature grows with k^2): they are redone with smaller steps."""
    ds = cake(Scaled(mlp_teacher, k), num_classes=10, input_shape=(1, 8, 8), num_samples=400, batch_size=100,
              steps=60, progress=False)
    assert torch.isfinite(ds.inputs).all() and ds.inputs.abs().max() <= 100.0
    assert ds.teacher_agreement() > 0.5
    if k == 100.0:
        assert ds.meta["backoffs"] and ds.meta["backoffs"][0][0] == 0 and ds.meta["backoffs"][0][1] < 0.1


def test_cake_backoff_is_deterministic_and_resumes(mlp_teacher, tmp_path):
    t = Scaled(mlp_teacher, 100.0)
    kw = dict(num_classes=10, input_shape=(1, 8, 8), num_samples=200, batch_size=100, steps=20, progress=False)
    a = cake(t, **kw)
    b = cake(t, out_dir=str(tmp_path / "s"), **kw)
    assert torch.equal(a.inputs, b.inputs) and a.meta["backoffs"] == b.meta["backoffs"] != []


def test_cake_runaway_without_backoff_names_the_cause(mlp_teacher):
    with pytest.raises(FloatingPointError, match=r"batch 0 ran away .*\|x\|.*max_abs=100"):
        cake(Scaled(mlp_teacher, 100.0), num_classes=10, input_shape=(1, 8, 8), num_samples=100, steps=20,
             backoff=0, progress=False)
    with pytest.raises(ValueError, match="max_abs"):
        cake(mlp_teacher, num_classes=10, input_shape=(1, 8, 8), num_samples=100, max_abs=0.0, progress=False)


def test_bundled_teacher_small_budget_stays_bounded():
    """The bundled digits teacher at the default lr start (0.1) and 20 steps: the first batch
    used to run away to |x| ~ 1e9 and train a NaN student."""
    from fastkd.teachers import load_teacher

    t, _ = load_teacher("digits")
    ds = cake(t, num_classes=10, input_shape=(1, 8, 8), num_samples=300, steps=20, progress=False)
    assert ds.inputs.abs().max() <= 100.0 and ds.meta["backoffs"]
    s = models.create("cnn_half", input_size=8)
    h = train_student(s, ds, epochs=2, batch_size=64, lr=0.1, progress=False)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in h.epochs)


def test_nonfinite_training_loss_stops_with_the_cause():
    x = torch.randn(64, 1, 8, 8)
    x[3, 0, 2, 2] = 1e30  # a runaway synthetic input
    p = torch.full((64, 10), 0.1)
    s = models.create("cnn_half", input_size=8)
    with pytest.raises(FloatingPointError, match="training loss is .*runaway synthetic set|NaN or Inf"):
        train_student(s, (x, p), epochs=3, batch_size=16, progress=False)
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="training inputs hold NaN"):
        train_student(models.create("cnn_half", input_size=8), (x, p), epochs=1, batch_size=64, progress=False)


def test_check_student_collapse_and_warnings(mlp_teacher):
    _, _, x, _ = data.digits(8)

    class One(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, z):
            out = torch.zeros(z.shape[0], 10) + self.w
            out[:, self.c] = 1.0
            return out

    with pytest.raises(StudentCollapsedError, match="predicts class 3 for 100%"):
        check_student(One(3), mlp_teacher, x)
    rep = check_student(mlp_teacher, mlp_teacher, x)
    assert rep["agreement"] == 1.0 and rep["warnings"] == []

    class Shifted(nn.Module):  # agrees with the teacher on no input
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, z):
            return self.m(z).roll(1, dims=1)

    rep = check_student(Shifted(mlp_teacher), mlp_teacher, x)
    assert rep["agreement"] < 0.5 and any("agrees with the teacher on only" in w for w in rep["warnings"])
