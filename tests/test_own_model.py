"""Your own teacher, data and student through `fastkd distill`: a torchvision ResNet-18 for
3x32x32 images (random weights) in every teacher format, an image-folder eval set, a
torchvision student."""
import json
import os

import numpy as np
import pytest
import torch

from fastkd import data, models
from fastkd.cli import main
from fastkd.teachers import load_teacher

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    out = {}
    torch.save(m.state_dict(), d / "sd.pt")
    out["state_dict"] = [str(d / "sd.pt"), "--teacher-model", "torchvision:resnet18", "--input-shape", "3,32,32"]
    ep = torch.export.export(m, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, d / "t.pt2")
    out["export"] = [str(d / "t.pt2")]
    ep1 = torch.export.export(m, (torch.randn(4, 3, 32, 32),))  # a fixed batch size of 4
    torch.export.save(ep1, d / "t4.pt2")
    out["export_fixed_batch"] = [str(d / "t4.pt2")]
    torch.jit.trace(m, torch.randn(2, 3, 32, 32)).save(d / "ts.pt")
    out["torchscript"] = [str(d / "ts.pt"), "--input-shape", "3,32,32"]
    torch.save(m, d / "whole.pt")
    out["pickled"] = [str(d / "whole.pt"), "--trust-teacher-file", "--input-shape", "3,32,32"]
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(d / "eval" / f"c{c}")
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "eval" / f"c{c}" / f"{i}.png")
    return d, m, out


@pytest.mark.parametrize("fmt", ["state_dict", "export", "export_fixed_batch", "torchscript", "pickled"])
def test_distill_torchvision_teacher_every_format(files, fmt, tmp_path, capsys):
    d, m, formats = files
    run = str(tmp_path / "run")
    rc = main(["distill", "--method", "cake", "--teacher", *formats[fmt], "--student", "torchvision:resnet18",
               "--num-samples", "10", "--batch-size", "5", "--steps", "1", "--epochs", "1",
               "--student-batch-size", "5", "--eval-data", str(d / "eval"), "--mean", "0.5", "--std", "0.25",
               "--out", run, "--quiet", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    s = json.load(open(os.path.join(run, "summary.json")))
    assert s["status"] == "ok" and 0.0 <= s["student_accuracy"] <= 1.0
    assert s["synthesis"]["clamp"] == [-2.0, 2.0]  # the normalised pixel range of mean 0.5, std 0.25
    student, info = load_teacher(os.path.join(run, "student.pt"))
    assert info["model"] == "torchvision:resnet18" and info["normalize"] == {"mean": [0.5], "std": [0.25]}
    x = torch.randn(3, 3, 32, 32)
    ts = torch.jit.load(os.path.join(run, "student.torchscript.pt"))
    torch.testing.assert_close(ts(x), student(x))
    assert "load_teacher(" in out.out and "torch.jit.load(" in out.out


def test_exported_teacher_reads_shapes_and_matches(files):
    d, m, _ = files
    for name in ("t.pt2", "t4.pt2"):
        t, info = load_teacher(str(d / name))
        assert info["input_shape"] == (3, 32, 32) and info["num_classes"] == 10
        x = torch.randn(7, 3, 32, 32)  # 7: not a multiple of the fixed batch of 4
        torch.testing.assert_close(t(x), m(x), rtol=1e-4, atol=1e-4)
        t.eval()  # a no-op on the exported graph, not an error


def test_pickled_teacher_needs_trust(files):
    d, _, _ = files
    with pytest.raises(ValueError, match="runs code from the file.*trust=True"):
        load_teacher(str(d / "whole.pt"))
    t, info = load_teacher(str(d / "whole.pt"), trust=True)
    assert info["model"] == "pickled module"


def test_state_dict_infers_classes_and_rejects_wrong_arch(files, tmp_path):
    d, _, _ = files
    t, info = load_teacher(str(d / "sd.pt"), model="torchvision:resnet18")
    assert info["num_classes"] == 10 and info["in_channels"] == 3
    with pytest.raises(ValueError, match="does not fit model 'resnet18'"):
        load_teacher(str(d / "sd.pt"), model="resnet18")  # fastkd's CIFAR-style net of the same name
    with pytest.raises(ValueError, match="torchvision has no classification model"):
        load_teacher(str(d / "sd.pt"), model="torchvision:nonet")


def test_module_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def tiny(num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, num_classes))\n"
        "def notamodel():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = models.build("mynets:tiny", num_classes=5, in_channels=3)
    assert m(torch.zeros(2, 3, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="not an nn.Module"):
        models.build("mynets:notamodel")
    with pytest.raises(ValueError, match="cannot import"):
        models.build("no_such_pkg_xyz:f")


def test_load_labelled_formats_and_checks(tmp_path, files):
    d, _, _ = files
    x, y = data.load_labelled(str(d / "eval"), input_shape=(3, 32, 32), mean=[0.5], std=[0.25])
    assert x.shape == (9, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert float(x.min()) >= -2.0 and float(x.max()) <= 2.0
    imgs = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)  # NHWC
    np.savez(tmp_path / "e.npz", images=imgs, labels=np.arange(4))
    x2, y2 = data.load_labelled(str(tmp_path / "e.npz"), input_shape=(3, 32, 32))
    assert x2.shape == (4, 3, 32, 32) and torch.allclose(x2[1, 2], torch.tensor(imgs[1, :, :, 2] / 255.0).float())
    torch.save({"x": torch.randn(4, 3, 32, 32), "y": torch.arange(4)}, tmp_path / "e.pt")
    x3, _ = data.load_labelled(str(tmp_path / "e.pt"), input_shape=(3, 32, 32))
    assert x3.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"--eval-data .* shape \(3, 32, 32\).*teacher takes \(1, 28, 28\)"):
        data.load_labelled(str(tmp_path / "e.pt"), input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="no labels array"):
        np.savez(tmp_path / "bad.npz", images=imgs)
        data.load_labelled(str(tmp_path / "bad.npz"), input_shape=(3, 32, 32))


def test_cli_errors_before_any_work(files, tmp_path, capsys):
    d, _, formats = files
    common = ["--num-samples", "10", "--steps", "1", "--epochs", "1", "--quiet", "--device", "cpu"]
    cases = [
        (["--teacher", *formats["export"], "--student", "torchvision:nonet", "--eval-data", str(d / "eval")], "--student"),
        (["--teacher", *formats["export"], "--student", "cnn_half", "--eval-data", str(tmp_path / "nope")],
         "--eval-data"),
        (["--teacher", str(d / "ts.pt"), "--student", "cnn_half"], "--input-shape"),
        (["--teacher", *formats["export"], "--student", "torchvision:resnet18", "--mean", "0.5", "0.5"], "--mean"),
        (["--teacher", *formats["export"], "--student", "torchvision:resnet18", "--num-classes", "7"],
         "--num-classes"),
    ]
    for i, (args, flag) in enumerate(cases):
        out = str(tmp_path / f"r{i}")
        try:
            rc = main(["distill", "--method", "cake", *args, "--out", out] + common)
        except SystemExit as e:  # argparse-level checks exit from the method's parser
            rc = e.code
        err = capsys.readouterr().err.strip()
        assert rc == 2 and flag in err and len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert not os.path.exists(os.path.join(out, "synthetic")), "no synthesis before the check"


@pytest.mark.parametrize("fmt", ["state_dict", "export", "export_fixed_batch", "torchscript", "pickled"])
def test_tadfkd_torchvision_teacher(files, fmt, tmp_path, capsys):
    """The same flags for TA-DFKD (its teacher needs BatchNorm layers: ResNet-18 has them)."""
    d, _, formats = files
    run = tmp_path / "run"
    argv = ["distill", "--method", "tadfkd", "--teacher", *formats[fmt], "--student", "torchvision:resnet18",
            "--eval-data", str(d / "eval"), "--mean", "0.5", "--std", "0.25", "--out", str(run),
            "--iterations", "2", "--student-steps", "1", "--batch-size", "4", "--nz", "8", "--ngf", "4",
            "--eval-every", "0", "--quiet", "--device", "cpu"]
    if fmt.startswith("export") or fmt == "torchscript":
        # a compiled graph has no BatchNorm modules to hook: one line says so
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no BatchNorm layer" in err and len(err.strip().splitlines()) == 1
        argv += ["--bn-weight", "0"]
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and s["method"] == "tadfkd" and 0.0 <= s["final_test_acc"] <= 1.0
    assert s["run"]["command"].startswith("fastkd distill --method tadfkd")
    assert s["student_check"]["checked_on"] == "the held-out inputs"
    student, info = load_teacher(str(run / "student.pt"))
    assert info["model"] == "torchvision:resnet18" and student(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert (run / "student.torchscript.pt").exists() and (run / "samples.png").exists()


def test_mekd_served_torchvision_teacher_with_own_edge_data(files, tmp_path, capsys):
    """MEKD with the same flags: the served model's shape and classes come from the server's
    metadata, the edge data is the user's image folder, the student a torchvision model."""
    pytest.importorskip("uvicorn")
    from fastkd.serve import ServerThread, create_app

    d, m, _ = files
    app = create_app(m, input_shape=[3, 32, 32], num_classes=10, name="r18", response="soft")
    run = tmp_path / "run"
    with ServerThread(app) as srv:
        url = f"{srv.url}/v2/models/r18"
        common = ["distill", "--method", "mekd", "--teacher-url", url, "--out", str(run), "--quiet",
                  "--budget", "40", "--gan-steps", "1", "--info-per-step", "0", "--epochs", "1"]
        # the edge images must fit the served model: one line before any paid query
        np.savez(tmp_path / "gray.npz", images=np.zeros((4, 28, 28), dtype=np.uint8), labels=np.zeros(4))
        assert main(common + ["--edge-data", str(tmp_path / "gray.npz")]) == 2
        err = capsys.readouterr().err
        assert "--edge-data" in err and "(3, 32, 32)" in err and app.state.stats["inference_count"] == 0
        rc = main(common + ["--edge-data", str(d / "eval"), "--eval-data", str(d / "eval"),
                            "--student", "torchvision:resnet18", "--mean", "0.5", "--std", "0.25"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        paid = app.state.stats["inference_count"]
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and s["results"]["mekd"]["queries"]["queries_paid_total"] == paid <= 40
    assert 0.0 <= s["results"]["mekd"]["test_acc"] <= 1.0 and s["edge_data"] == str(d / "eval")
    student, info = load_teacher(str(run / "student.pt"))
    assert info["model"] == "torchvision:resnet18" and student(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert (run / "student.torchscript.pt").exists()


def test_serve_teacher_loads_every_format(files):
    """`fastkd serve-teacher MODEL` resolves its model as every method's --teacher does."""
    from fastkd.commands.serve_teacher import load_model

    d, _, formats = files
    assert load_model(str(d / "t.pt2"))[1:] == ([3, 32, 32], 10)
    assert load_model(str(d / "sd.pt"), arch="torchvision:resnet18", input_shape=[3, 32, 32])[1:] == ([3, 32, 32], 10)
    with pytest.raises(SystemExit, match="trust"):
        load_model(str(d / "whole.pt"), input_shape=[3, 32, 32])
    assert load_model(str(d / "whole.pt"), input_shape=[3, 32, 32], trust=True)[2] == 10
    with pytest.raises(SystemExit, match="--input-shape"):
        load_model(str(d / "ts.pt"))
