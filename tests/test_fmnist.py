"""Fashion-MNIST: the IDX reader, the data set (real files from Debian's dataset-fashion-mnist),
the bundled teachers, the relabelled augmentations and ``fastkd demo --data fmnist``."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastkd import data, distill
from fastkd.teachers import FMNIST_TEACHERS, fmnist_teacher, load_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _have_fmnist() -> bool:
    try:
        data._find_fmnist(None)
        return True
    except FileNotFoundError:
        return False


# Without the package the real-data tests skip, naming what to install; CI installs it and sets
# FASTKD_REQUIRE_FMNIST=1 so that a missing package fails there instead of skipping.
if not _have_fmnist() and os.environ.get("FASTKD_REQUIRE_FMNIST"):
    raise RuntimeError("FASTKD_REQUIRE_FMNIST is set but the Fashion-MNIST files are missing: "
                       "apt-get install dataset-fashion-mnist")
needs_fmnist = pytest.mark.skipif(not _have_fmnist(), reason="Fashion-MNIST files missing: "
                                  "apt-get install dataset-fashion-mnist")


def _write_idx(path, arr: np.ndarray, code: int = 0x08, gz: bool = True, truncate: int = 0):
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    body = arr.astype({0x08: ">u1", 0x0D: ">f4"}[code]).tobytes()
    raw = head + (body[:-truncate] if truncate else body)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def _fake_tree(root, n_train=12, n_test=5, gz=True):
    rng = np.random.RandomState(0)
    os.makedirs(root, exist_ok=True)
    ext = ".gz" if gz else ""
    _write_idx(os.path.join(root, "train-images-idx3-ubyte" + ext), rng.randint(0, 256, (n_train, 28, 28)), gz=gz)
    _write_idx(os.path.join(root, "train-labels-idx1-ubyte" + ext), np.arange(n_train) % 10, gz=gz)
    _write_idx(os.path.join(root, "t10k-images-idx3-ubyte" + ext), rng.randint(0, 256, (n_test, 28, 28)), gz=gz)
    _write_idx(os.path.join(root, "t10k-labels-idx1-ubyte" + ext), np.arange(n_test) % 10, gz=gz)


# --------------------------------------------------------------------------- IDX reader
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.random.RandomState(1).randint(0, 256, (3, 5, 7))
    p = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    _write_idx(p, a, gz=gz)
    np.testing.assert_array_equal(data._read_idx(p), a)
    f = np.random.RandomState(2).randn(4, 2).astype(np.float32)
    _write_idx(p, f, code=0x0D, gz=gz)
    np.testing.assert_array_equal(data._read_idx(p), f)


def test_read_idx_rejects_bad_files(tmp_path):
    p = str(tmp_path / "t.gz")
    _write_idx(p, np.zeros((4, 3)), truncate=2)
    with pytest.raises(ValueError, match="truncated"):
        data._read_idx(p)
    q = tmp_path / "bad"
    q.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="bad magic"):
        data._read_idx(str(q))


@pytest.mark.parametrize("layout", ["flat", "torchvision", "plain"])
def test_fmnist_from_a_given_root_and_torchvision_layout(tmp_path, layout):
    root = str(tmp_path)
    where = {"flat": root, "plain": root, "torchvision": os.path.join(root, "FashionMNIST", "raw")}[layout]
    _fake_tree(where, gz=layout != "plain")
    x, y, xt, yt = data.fmnist(32, root=root)
    assert x.shape == (12, 1, 32, 32) and xt.shape == (5, 1, 32, 32)
    assert y.tolist() == [i % 10 for i in range(12)] and yt.dtype == torch.int64
    info = data.fmnist_info(32, root=root)
    lo, hi = info["pixel_range"]
    # the 2-pixel zero padding is black: the lowest value of the normalised range
    assert torch.allclose(x[:, :, :2, :], torch.full_like(x[:, :, :2, :], lo))
    assert float(x.min()) >= lo - 1e-5 and float(x.max()) <= hi + 1e-5
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4
    assert data.fmnist(28, root=root)[0].shape == (12, 1, 28, 28)


def test_fmnist_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fmnist(root=str(tmp_path))
    with pytest.raises(ValueError, match="size must be an int >= 8"):
        data.fmnist(4)


# --------------------------------------------------------------------------- real data, teachers
@needs_fmnist
def test_fmnist_real_files():
    x, y, xt, yt = data.fmnist()
    assert x.shape == (60000, 1, 32, 32) and xt.shape == (10000, 1, 32, 32)
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    info = data.fmnist_info()
    assert info["input_shape"] == (1, 32, 32) and len(info["classes"]) == 10
    assert 0.2 < info["mean"] < 0.25 and 0.3 < info["std"] < 0.36  # 32x32 with the black border


@needs_fmnist
@pytest.mark.parametrize("name", sorted(FMNIST_TEACHERS))
def test_bundled_fmnist_teachers_reach_their_recorded_accuracy(name):
    model, info = fmnist_teacher(name)
    assert info["input_shape"] == [1, 32, 32] and info["num_classes"] == 10
    _, _, xt, yt = data.fmnist()
    acc = distill.evaluate(model, (xt, yt))
    assert acc == pytest.approx(info["test_accuracy"], abs=2e-3)
    assert acc > 0.90  # the CAKE paper's LeNet-5 teacher: 91.0
    assert load_teacher(name)[1]["model"] == FMNIST_TEACHERS[name][0]


def test_fmnist_teacher_bad_name():
    with pytest.raises(ValueError, match="name must be one of"):
        fmnist_teacher("cifar")


# --------------------------------------------------------------------------- augmentations
def test_parse_augment():
    assert distill.parse_augment(None) == () and distill.parse_augment("none") == ()
    assert distill.parse_augment("shift+flip+mixup") == ("shift", "flip", "mixup")
    for bad in ("rotate", "shift+shift", "", "shift+", 3):
        with pytest.raises(ValueError, match="augment must be"):
            distill.parse_augment(bad)


def test_apply_augment_flip_and_mixup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 5, 7)
    f = distill.apply_augment(x, ("flip",), g)
    same = (f == x).flatten(1).all(1)
    flipped = (f == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 10 < int(flipped.sum()) < 54
    m = distill.apply_augment(x, ("mixup",), g)
    # every output is a convex combination of its own input and one other input of the batch
    for i in range(8):
        ok = False
        for j in range(64):
            d = x[i] - x[j]
            if float(d.abs().max()) == 0:
                ok = ok or torch.allclose(m[i], x[i])
                continue
            lam = float(((m[i] - x[j]) * d).sum() / (d * d).sum())
            ok = ok or (-1e-5 <= lam <= 1 + 1e-5 and torch.allclose(m[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5))
        assert ok
    s2 = distill.apply_augment(x, ("shift2",), torch.Generator().manual_seed(1))
    assert s2.shape == x.shape and not torch.equal(s2, x)


def test_train_student_combined_augment_relabels_every_batch():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    calls = []
    hook = teacher.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.randn(40, 1, 4, 4)
    p = torch.softmax(teacher(x), 1).detach()
    calls.clear()
    s = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    h = distill.train_student(s, (x, p), teacher=teacher, augment="shift+flip+mixup", epochs=2, batch_size=16,
                              lr=0.05, progress=False)
    hook.remove()
    assert sum(calls) == 80 and h.config["augment"] == "shift+flip+mixup"


# --------------------------------------------------------------------------- demo
@needs_fmnist
def test_demo_fmnist_cli_tiny(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "fastkd", "demo", "--data", "fmnist", "--num-samples", "200",
                        "--steps", "2", "--epochs", "1", "--out", str(out), "--quiet", "--threads", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary_cake_fmnist.json").read_text())
    assert s["data"] == "fmnist" and s["config"]["student"] == "lenet5_half"
    assert s["config"]["student_init"] == "teacher"  # the fmnist demo starts the student from the teacher
    assert s["config"]["prior"] == "silhouette"  # ... and the synthesis from objects on a black background
    assert "baseline (the prior's draws, clamped)" in r.stdout  # the baseline starts where the synthesis does
    assert 0.0 <= s["student_accuracy"] <= 1.0 and s["teacher_accuracy"] > 0.9
    assert (out / "samples_cake_fmnist.png").stat().st_size > 1000
    assert "teacher (lenet5)" in r.stdout


def test_demo_cli_rejects_bad_values_in_one_line(tmp_path):
    for args, msg in ((["--data", "fmnist", "--data-root", str(tmp_path)], "apt-get install dataset-fashion-mnist"),
                      (["--steps", "0"], "--steps must be a positive integer"),
                      (["--augment", "rotate"], "argument --augment")):
        r = subprocess.run([sys.executable, "-m", "fastkd", "demo", *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_synthesize_clamp_option(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastkd", "synthesize", "--teacher", "fmnist", "--clamp", "1", "0",
                        "--out", str(tmp_path / "x"), "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--clamp LO HI needs LO < HI" in r.stderr and "Traceback" not in r.stderr
    lo, hi = -0.5, 0.75
    r = subprocess.run([sys.executable, "-m", "fastkd", "synthesize", "--teacher", "fmnist", "--clamp", str(lo), str(hi),
                        "--num-samples", "20", "--batch-size", "10", "--steps", "3", "--lr", "1", "0.1",
                        "--out", str(tmp_path / "y"), "--quiet", "--no-grid"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from fastkd.synthesis import load_shards

    ds = load_shards(str(tmp_path / "y"))
    assert ds.inputs.shape == (20, 1, 32, 32)
    assert float(ds.inputs.min()) >= lo and float(ds.inputs.max()) <= hi
    assert ds.meta["clamp"] == [lo, hi]


@needs_fmnist
def test_fmnist_study_and_ablation_scripts_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = tmp_path / "study.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "fmnist_study.py"), "--budget", "smoke", "--seeds", "0",
           "--methods", "cake", "noise", "kd-real", "--threads", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["method"] for x in rows] == ["cake", "noise", "kd-real"]
    assert all(0 <= x["accuracy"] <= 1 and x["budget"] == "smoke" for x in rows)
    assert rows[0]["config"]["prior"] == rows[1]["config"]["prior"] == "silhouette"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # resumes: nothing to redo
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 3 and "skip cake" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fmnist_study.py"), "--report", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and (tmp_path / "study.png").stat().st_size > 1000
    assert "| cake | smoke | 1 |" in (tmp_path / "study.md").read_text()
    abl = tmp_path / "abl.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fmnist_ablation.py"),
                        json.dumps({"n": 20, "bs": 10, "steps": 1, "epochs": 1, "clamp": True}), "--out", str(abl)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(abl.read_text())["n"] == 20
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fmnist_ablation.py"), '{"bogus": 1}',
                        "--out", str(abl)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "keys from" in r.stderr


@needs_fmnist
def test_demo_fmnist_tadfkd_and_mekd_tiny(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastkd", "demo", "--method", "tadfkd", "--data", "fmnist", "--quick",
                        "--out", str(tmp_path / "td"), "--quiet"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "td" / "summary.json").read_text())
    assert s["teacher"] == "fmnist-bn" and s["student"] == "lenet5_half" and s["teacher_accuracy"] > 0.9
    r = subprocess.run([sys.executable, "-m", "fastkd", "demo", "--method", "mekd", "--data", "fmnist", "--quick",
                        "--budget", "300", "--out", str(tmp_path / "md"), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "md" / "summary.json").read_text())
    assert s["config"]["student"] == "lenet5_half" and s["teacher_accuracy"] > 0.9
    assert s["results"]["mekd"]["queries"]["queries_paid_total"] == 300
    assert "/v2/models/fmnist" in s["teacher_url"]


def test_mekd_save_grid_without_images_writes_nothing(tmp_path):
    from fastkd.methods.mekd import save_grid

    assert save_grid(torch.zeros(0, 1, 8, 8), str(tmp_path / "g.png")) is False
    assert not (tmp_path / "g.png").exists()
    assert save_grid(torch.zeros(3, 1, 8, 8), str(tmp_path / "g.png")) is True and (tmp_path / "g.png").exists()


@needs_fmnist
@pytest.mark.slow
def test_train_fmnist_teacher_is_reproducible_and_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    from fastkd import teachers

    arch, kw, recipe, fn = teachers.FMNIST_TEACHERS["fmnist"]
    monkeypatch.setitem(teachers.FMNIST_TEACHERS, "fmnist", (arch, kw, dict(recipe, epochs=1), fn))
    torch.set_num_threads(1)
    m1, h1 = teachers.train_fmnist_teacher("fmnist", path=str(tmp_path / "t.pt"), progress=False)
    m2, h2 = teachers.train_fmnist_teacher("fmnist", progress=False)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert h1.final_accuracy == h2.final_accuracy > 0.75  # one epoch of the recipe
    t, info = load_teacher(str(tmp_path / "t.pt"))
    assert info["test_accuracy"] == h1.final_accuracy and info["input_shape"] == [1, 32, 32]
