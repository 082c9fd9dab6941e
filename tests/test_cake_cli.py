import json
import os

import pytest
import torch

from fastkd import models
from fastkd.cli import main
from fastkd.synthesis import SyntheticDataset
from fastkd.teachers import load_teacher, save_teacher


def test_help_texts(capsys):
    for argv in (["synthesize", "--help"], ["distill", "--method", "cake", "--help"], ["demo", "--method", "lake", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--num-samples" in out and "--teacher-model" in out and "noise baseline" in out


def test_synthesize_and_distill_cli(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert main(["synthesize", "--teacher", "digits", "--num-samples", "20", "--batch-size", "10", "--steps", "2",
                 "--out", out, "--quiet", "--device", "cpu"]) == 0
    ds = SyntheticDataset.load(os.path.join(out, "dataset.pt"))
    assert len(ds) == 20 and ds.input_shape == (1, 8, 8)
    assert os.path.exists(os.path.join(out, "samples.png"))
    run = str(tmp_path / "run")
    # 20 samples and one epoch teach the student nothing: the run says so (exit status 1) instead of
    # reporting success, and keeps what it wrote
    capsys.readouterr()
    assert main(["distill", "--method", "lake", "--teacher", "digits", "--student", "cnn_half", "--data", out,
                 "--epochs", "1", "--out", run, "--eval-digits", "--quiet", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "it learned nothing" in err and "Traceback" not in err
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["status"].startswith("failed: the student predicts class")
    assert 0.0 <= summary["student_accuracy"] <= 1.0 and summary["teacher_accuracy"] > 0.95
    assert summary["run"]["seed"] == 0 and summary["run"]["torch"] == torch.__version__
    student, info = load_teacher(os.path.join(run, "student.pt"))
    assert info["model"] == "cnn_half" and student(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    # a finished run's folder is not overwritten silently
    assert main(["distill", "--method", "lake", "--teacher", "digits", "--student", "cnn_half", "--data", out,
                 "--epochs", "1", "--out", run, "--quiet", "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_distill_cli_state_dict_and_torchscript_teacher(tmp_path, capsys):
    torch.manual_seed(0)
    t = models.create("mlp", num_classes=10, in_channels=1, input_size=8).eval()
    sd = str(tmp_path / "t_sd.pt")
    torch.save(t.state_dict(), sd)
    ts = str(tmp_path / "t_ts.pt")
    torch.jit.script(t).save(ts)
    common = ["--student", "mlp_half", "--num-samples", "20", "--batch-size", "10", "--steps", "1",
              "--epochs", "1", "--num-classes", "10", "--input-shape", "1,8,8", "--quiet", "--device", "cpu"]
    assert main(["distill", "--method", "cake", "--teacher", sd, "--out", str(tmp_path / "a")] + common) == 2
    err = capsys.readouterr().err
    assert "plain state_dict" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="plain state_dict"):  # --debug: the exception itself
        main(["--debug", "distill", "--method", "cake", "--teacher", sd, "--out", str(tmp_path / "a")] + common)
    assert main(["distill", "--method", "cake", "--teacher", sd, "--teacher-model", "mlp",
                 "--out", str(tmp_path / "a")] + common) == 0
    assert main(["distill", "--method", "cake", "--teacher", ts, "--out", str(tmp_path / "b")] + common) == 0


def test_teacher_checkpoint_roundtrip(tmp_path):
    m = models.create("cnn", input_size=8)
    p = save_teacher(m, str(tmp_path / "t.pt"), name="cnn", num_classes=10, in_channels=1, kwargs={"input_size": 8})
    back, info = load_teacher(p)
    assert info["model"] == "cnn" and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                                           back.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        load_teacher(str(tmp_path / "missing.pt"))


def test_demo_tiny(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--method", "cake", "--num-samples", "60", "--steps", "2", "--epochs", "1", "--out", out,
                 "--quiet"]) == 0
    s = json.load(open(os.path.join(out, "summary_cake.json")))
    assert s["teacher_accuracy"] > 0.95 and "baseline_accuracy" in s and s["seed"] == 0
    assert os.path.exists(s["sample_grid"])
    printed = capsys.readouterr().out
    assert "baseline" in printed and "teacher" in printed


def test_distill_cli_student_init_teacher(tmp_path, capsys):
    common = ["distill", "--method", "cake", "--teacher", "digits", "--num-samples", "20", "--batch-size", "10",
              "--steps", "1", "--epochs", "1", "--eval-digits", "--quiet", "--device", "cpu"]
    # a student of another family cannot start from the teacher: one line naming the flag, before any synthesis
    out = tmp_path / "bad"
    assert main(common + ["--student", "mlp_half", "--student-init", "teacher", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.count("--student-init teacher") == 1 and "Traceback" not in err
    assert not (out / "synthetic").exists()
    with pytest.raises(SystemExit) as e:
        main(common + ["--student", "cnn_half", "--student-init", "sideways", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--student-init" in capsys.readouterr().err
    # the half-width student starts from the teacher's channels: recorded, and far from chance after 20 samples
    run = tmp_path / "run"
    assert main(common + ["--student", "cnn_half", "--student-init", "teacher", "--out", str(run)]) == 0
    summary = json.load(open(run / "summary.json"))
    assert summary["config"]["student_init"] == "teacher" and summary["student_accuracy"] > 0.5
