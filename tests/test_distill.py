import os

import pytest
import torch
import torch.nn.functional as F

from fastkd import distill, models
from fastkd.nn import KDLoss, kd_loss, soft_cross_entropy
from fastkd.synthesis import SyntheticDataset


def test_kd_loss_matches_hinton():
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    tau = 3.0
    ref = tau ** 2 * F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")
    assert torch.allclose(KDLoss(tau)(s, t).double(), ref, rtol=1e-5)
    # probabilities as targets give the same loss
    assert torch.allclose(kd_loss(s, t.softmax(1), tau, target="probs").double(), ref, rtol=1e-4)
    assert kd_loss(s, t, tau, reduction="none").shape == (5,)


def test_soft_ce_gradient_equals_kl_gradient():
    s = torch.randn(6, 5, requires_grad=True)
    p = torch.randn(6, 5).softmax(1)
    (g1,) = torch.autograd.grad(soft_cross_entropy(s, p, 2.0), s)
    (g2,) = torch.autograd.grad(kd_loss(s, p, 2.0, target="probs"), s)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_kd_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="target"):
        KDLoss(target="nope")


def _tiny():
    torch.manual_seed(0)
    teacher = models.create("cnn", num_classes=10, in_channels=1, width=0.25).eval()
    x = torch.randn(64, 1, 8, 8)
    return teacher, x


def test_train_student_on_synthetic_dataset_and_determinism():
    teacher, x = _tiny()
    ds = SyntheticDataset(x, distill.teacher_probs(teacher, x), torch.arange(64) % 10)
    res = []
    for _ in range(2):
        torch.manual_seed(1)
        s = models.create("cnn_half", width=0.25)
        h = distill.train_student(s, ds, epochs=2, batch_size=16, lr=0.05, eval_data=(x, ds.probs.argmax(1)),
                                  progress=False, seed=3)
        res.append((h.losses, [p.detach().clone() for p in s.parameters()]))
    assert len(res[0][0]) == 2 and h.final_accuracy is not None
    assert res[0][0] == res[1][0]
    assert all(torch.equal(a, b) for a, b in zip(res[0][1], res[1][1]))


def test_train_student_learns_teacher():
    teacher, x = _tiny()
    x = torch.randn(512, 1, 8, 8)
    torch.manual_seed(0)
    s = models.create("cnn_half")
    labels = distill.teacher_probs(teacher, x).argmax(1)
    h = distill.train_student(s, x, teacher=teacher, epochs=6, batch_size=64, lr=0.1, loss="kl", temperature=2.0,
                              eval_data=(x, labels), progress=False)
    assert h.losses[-1] < h.losses[0]
    assert h.final_accuracy > 0.5


def test_logit_l1_is_the_centred_logit_distance():
    s, t = torch.randn(6, 5, dtype=torch.float64), 4 * torch.randn(6, 5, dtype=torch.float64)
    want = ((s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))).abs().mean()
    torch.testing.assert_close(distill._logit_l1(s, t.softmax(1)), want)  # from stored probabilities
    torch.testing.assert_close(distill._centred_l1(s, t.log_softmax(1)), want)
    torch.testing.assert_close(distill._centred_l1(s, t + 7.0), want)  # a shift of the logits changes nothing


@pytest.mark.parametrize("augment", [None, "shift"])
def test_train_student_logit_l1_learns_teacher(augment):
    teacher, _ = _tiny()
    x = torch.randn(512, 1, 8, 8)
    torch.manual_seed(0)
    s = models.create("cnn_half")
    labels = distill.teacher_probs(teacher, x).argmax(1)
    h = distill.train_student(s, x, teacher=teacher, epochs=6, batch_size=64, lr=0.05, loss="logit_l1",
                              augment=augment, eval_data=(x, labels), progress=False)
    assert h.losses[-1] < 0.7 * h.losses[0]
    assert h.final_accuracy > 0.5


def test_train_student_dataloader_labelled_by_teacher():
    teacher, x = _tiny()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)
    s = models.create("cnn_half", width=0.25)
    h = distill.train_student(s, loader, teacher=teacher, epochs=1, progress=False)
    assert len(h.epochs) == 1 and h.epochs[0]["loss"] > 0


def test_train_student_bad_input():
    teacher, x = _tiny()
    s = models.create("cnn_half", width=0.25)
    with pytest.raises(ValueError, match="teacher is required"):
        distill.train_student(s, x, epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        distill.train_student(s, x, teacher=teacher, epochs=0)
    with pytest.raises(ValueError, match="loss"):
        distill.train_student(s, x, teacher=teacher, epochs=1, loss="mse")
    with pytest.raises(TypeError, match="data must be"):
        distill.train_student(s, [1, 2, 3], teacher=teacher, epochs=1)


def test_evaluate_and_train_teacher_tiny():
    x = torch.randn(40, 1, 8, 8)
    y = torch.arange(40) % 10
    m = models.create("cnn", width=0.25)
    m, h = distill.train_teacher(m, data=(x, y, x, y), epochs=3, batch_size=8, progress=False)
    acc = distill.evaluate(m, (x, y))
    assert acc == h.final_accuracy and 0.0 <= acc <= 1.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    assert distill.evaluate(m, loader) == acc


class _Recorder(torch.nn.Module):
    """Wraps a teacher and keeps every input it is asked about."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_shift_augment_is_a_per_sample_translation():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    g = torch.Generator().manual_seed(0)
    y = distill._shift_augment(x, g, max_shift=1)
    assert y.shape == x.shape
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    for i in range(2):  # each sample is one of the 9 crops of its replicate-padded self, all channels alike
        crops = [pad[i, :, dy:dy + 5, dx:dx + 6] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(y[i], c) for c in crops)


def test_train_student_shift_augment_relabels_with_teacher_and_is_deterministic():
    teacher, x = _tiny()
    ds = SyntheticDataset(x, distill.teacher_probs(teacher, x), torch.arange(64) % 10)
    runs = []
    for _ in range(2):
        rec = _Recorder(teacher)
        torch.manual_seed(1)
        s = models.create("cnn_half", width=0.25)
        h = distill.train_student(s, ds, teacher=rec, augment="shift", epochs=2, batch_size=16, lr=0.05,
                                  progress=False, seed=3)
        runs.append((h.losses, rec.seen))
    seen = runs[0][1]
    assert len(seen) == 2 * 4  # every batch of every epoch was labelled by the teacher
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    # the teacher saw shifted inputs, not the stored ones
    stored = {tuple(v.flatten().tolist()) for v in x}
    shifted = sum(tuple(v.flatten().tolist()) not in stored for b in seen for v in b)
    assert shifted > 0.5 * sum(b.shape[0] for b in seen)
    # without augmentation the stored probabilities are used and the teacher is never called
    rec = _Recorder(teacher)
    distill.train_student(models.create("cnn_half", width=0.25), ds, teacher=rec, epochs=1, batch_size=16,
                          progress=False)
    assert rec.seen == []


def test_train_student_augment_bad_input():
    teacher, x = _tiny()
    ds = SyntheticDataset(x, distill.teacher_probs(teacher, x), torch.arange(64) % 10)
    s = models.create("cnn_half", width=0.25)
    with pytest.raises(ValueError, match="augment must be"):
        distill.train_student(s, ds, teacher=teacher, augment="rotate", epochs=1)
    with pytest.raises(ValueError, match="teacher is required"):
        distill.train_student(s, ds, augment="shift", epochs=1)
    mlp_teacher = torch.nn.Linear(5, 3)
    flat = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        distill.train_student(torch.nn.Linear(5, 3), flat, teacher=mlp_teacher, augment="shift", epochs=1,
                              progress=False)


def test_train_student_checkpoint_resumes_to_the_same_weights(tmp_path):
    from fastkd import models
    from fastkd.distill import train_student

    torch.manual_seed(0)
    x = torch.randn(96, 1, 8, 8)
    p = torch.softmax(torch.randn(96, 10), 1)

    def fresh():
        torch.manual_seed(1)
        return models.create("cnn_half", input_size=8)

    full = fresh()
    h_full = train_student(full, (x, p), epochs=4, batch_size=32, lr=0.1, progress=False)

    class Stop(Exception):
        pass

    lines = []

    def interrupt(line):
        lines.append(line)
        if "2/4" in line:
            raise Stop  # killed right after epoch 2 was checkpointed

    ck = str(tmp_path / "ck.pt")
    with pytest.raises(Stop):
        train_student(fresh(), (x, p), epochs=4, batch_size=32, lr=0.1, log=interrupt, checkpoint=ck, name="student")
    assert os.path.exists(ck) and lines[0].startswith("distill [student]")
    resumed = fresh()
    msgs = []
    h = train_student(resumed, (x, p), epochs=4, batch_size=32, lr=0.1, log=msgs.append, checkpoint=ck)
    assert any("resuming after epoch 2 of 4" in m for m in msgs) or h.epochs[0]["epoch"] == 1
    assert [e["epoch"] for e in h.epochs] == [1, 2, 3, 4]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert h.epochs[-1]["loss"] == h_full.epochs[-1]["loss"]
    assert not os.path.exists(ck)  # removed once training completed
    # a checkpoint of another configuration is refused, not silently mixed in
    with pytest.raises(Stop):
        train_student(fresh(), (x, p), epochs=4, batch_size=32, lr=0.1, log=interrupt, checkpoint=ck)
    with pytest.raises(ValueError, match="another configuration .*lr"):
        train_student(fresh(), (x, p), epochs=4, batch_size=32, lr=0.2, progress=False, checkpoint=ck)
