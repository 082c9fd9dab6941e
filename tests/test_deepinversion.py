"""DeepInversion: the method that shows the method contract (Config + run, shared CLI)."""
import json

import pytest
import torch

from fastkd import data, distill, models
from fastkd.cli import main
from fastkd.methods import deepinversion as di
from fastkd.nn import BNStatsLoss
from fastkd.teachers import load_teacher, save_teacher


@pytest.fixture(scope="module")
def bn_teacher(tmp_path_factory):
    torch.manual_seed(0)
    m = models.create("cnn_bn", num_classes=10, in_channels=1, input_size=8)
    m, h = distill.train_teacher(m, data=data.digits(8), size=8, epochs=4, progress=False)
    assert h.final_accuracy > 0.8
    path = save_teacher(m, str(tmp_path_factory.mktemp("t") / "bn.pt"), name="cnn_bn", num_classes=10, in_channels=1,
                        input_shape=(1, 8, 8), kwargs={"input_size": 8})
    return m.eval(), path


def test_synthesis_matches_the_bn_statistics(bn_teacher):
    m, _ = bn_teacher
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    bn = BNStatsLoss(m)
    with torch.no_grad():
        m(x0)
        before = float(bn())
    bn.remove()
    ds = di.synthesize(m, config=di.Config(num_samples=64, batch_size=64, steps=60), num_classes=10,
                       input_shape=(1, 8, 8), progress=False)
    bn = BNStatsLoss(m)
    with torch.no_grad():
        m(ds.inputs)
        after = float(bn())
    bn.remove()
    assert after < 0.5 * before and ds.teacher_agreement() > 0.9
    # deterministic given the seed
    again = di.synthesize(m, config=di.Config(num_samples=64, batch_size=64, steps=60), num_classes=10,
                          input_shape=(1, 8, 8), progress=False)
    assert torch.equal(ds.inputs, again.inputs)


def test_config_validation_names_the_flag(bn_teacher, tmp_path, capsys):
    _, path = bn_teacher
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        di.Config(batch_size=1).validate()
    with pytest.raises(SystemExit) as e:
        main(["distill", "--method", "deepinversion", "--teacher", path, "--steps", "0", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "--steps must be an int >= 1" in capsys.readouterr().err


def test_cli_through_the_shared_contract(bn_teacher, tmp_path, capsys):
    _, path = bn_teacher
    run = tmp_path / "run"
    rc = main(["distill", "--method", "deepinversion", "--teacher", path, "--eval-data", "digits",
               "--num-samples", "300", "--steps", "40", "--epochs", "8", "--student-batch-size", "32",
               "--out", str(run), "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "ok" and s["method"] == "deepinversion" and s["config"]["steps"] == 40
    assert s["teacher_accuracy"] > 0.8 and s["student_accuracy"] > 0.3  # well above chance (0.1)
    assert s["run"]["backends"]  # the fused ops it ran on are recorded
    student, info = load_teacher(str(run / "student.pt"))
    assert info["model"] == "cnn_half" and (run / "samples.png").exists()
    # --help is generated from the Config's fields
    with pytest.raises(SystemExit):
        main(["distill", "--method", "deepinversion", "--help"])
    out = capsys.readouterr().out
    assert "--w-bn" in out and "weight of the BatchNorm-statistics term" in out and "--eval-data" in out
