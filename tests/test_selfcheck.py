"""`fastkd info --check`: every available backend of every op against the reference."""
import os
import re
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import selfcheck
from fastkd.cli import main

ROW = re.compile(r"^(?P<op>\S.{25}) (?P<device>\S+)\s+(?P<backend>\S+)\s+(?P<dtype>float\d\d)\s+(?P<err>\S+)\s+"
                 r"(?P<tol>\S+)\s+(?P<result>ok|FAIL)")


def _rows(out: str):
    return [m.groupdict() for m in map(ROW.match, out.splitlines()) if m]


def _expected_rows(devices):
    n = 0
    for chk in selfcheck.CHECKS:
        for dev in devices:
            n += 2 * len(selfcheck.backends_for(dev, chk.backends))
    return n


def test_check_table_on_this_machine(capsys):
    rc = main(["info", "--check"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == _expected_rows(selfcheck.devices())
    assert {r["op"].strip() for r in rows} == {c.name for c in selfcheck.CHECKS}
    # the reference backend agrees with the reference; every backend ran
    assert all(r["result"] == "ok" for r in rows if r["backend"] == "torch")
    assert all(r["err"] != "-" for r in rows), out
    failed = [r for r in rows if r["result"] == "FAIL"]
    assert not failed and rc == 0, out  # every backend of every op agrees with the reference here
    assert re.search(rf"self-check: {len(rows)} checks on cpu.*, 0 failed", out)
    if fastkd.backends()["cpp"].available:
        assert {r["backend"] for r in rows} >= {"cpp", "torch"}


def test_a_wrong_backend_fails_the_check(capsys, monkeypatch):
    import fastkd.ops as ops

    real = ops.tv_loss

    def off_by_a_little(x, **kw):
        y = real(x, **kw)
        return y * (1 + 1e-6) if kw.get("backend") != "torch" else y

    monkeypatch.setattr(ops, "tv_loss", off_by_a_little)
    monkeypatch.setattr(selfcheck, "CHECKS", tuple(c for c in selfcheck.CHECKS if c.name == "tv_loss"))
    monkeypatch.setattr(selfcheck, "devices", lambda: ["cpu"])
    monkeypatch.setattr(selfcheck, "backends_for", lambda dev, sup: ["torch", "cpp"])
    assert main(["info", "--check"]) == 1
    rows = _rows(capsys.readouterr().out)
    res = {(r["backend"], r["dtype"]): r["result"] for r in rows}
    assert res == {("torch", "float32"): "ok", ("torch", "float64"): "ok",
                   ("cpp", "float32"): "ok", ("cpp", "float64"): "FAIL"}  # 1e-6 > 1e-9, < 1e-4


def test_a_raising_backend_fails_with_its_error(capsys, monkeypatch):
    import fastkd.ops as ops

    def broken(*a, **kw):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(ops, "bn_stats_loss", broken)
    monkeypatch.setattr(selfcheck, "CHECKS", tuple(c for c in selfcheck.CHECKS if c.name == "bn_stats_loss"))
    monkeypatch.setattr(selfcheck, "devices", lambda: ["cpu"])
    monkeypatch.setattr(selfcheck, "backends_for", lambda dev, sup: ["cpp"])
    assert main(["info", "--check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  (RuntimeError: kernel launch failed)" in out


def test_backends_per_device():
    assert "torch" in selfcheck.backends_for("cpu", ("triton", "torch"))
    assert "cuda" not in selfcheck.backends_for("cpu", ("cuda", "torch"))
    assert selfcheck.devices()[0] == "cpu"
    assert len(selfcheck.devices()) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_check_runs_triton_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastkd", "info", "--check"], env=env, capture_output=True,
                       text=True, timeout=600)
    rows = _rows(r.stdout)
    tri = [row for row in rows if row["backend"] == "triton"]
    assert {row["op"].strip() for row in tri} == {c.name for c in selfcheck.CHECKS}, r.stdout + r.stderr
    assert all(row["result"] == "ok" for row in tri), r.stdout
    assert all(row["result"] == "ok" for row in rows) and r.returncode == 0, r.stdout


# --------------------------------------------------------------------------- tools/gpu_check.sh
GPU_CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gpu_check.sh")


def _gpu_check(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", GPU_CHECK, *args], env=env, capture_output=True, text=True, timeout=300)


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", GPU_CHECK], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_gpu_check_without_a_gpu_is_one_clear_line(tmp_path):
    r = _gpu_check("--out", str(tmp_path / "res"))
    assert r.returncode == 2
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device visible" in lines[0] and "--dry-run" in lines[0]
    assert not (tmp_path / "res").exists()


def test_gpu_check_dry_run_lists_every_stage(tmp_path):
    out = tmp_path / "res"
    r = _gpu_check("--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for piece in ("pip install --no-build-isolation --no-deps --no-index -e .", "tests/triton",
                  "tests/test_triton_compile.py", "-m fastkd info --check",
                  "-m fastkd bench --device cuda --quick", f"{out}/check.txt"):
        assert piece in text, piece
    assert not out.exists()  # a dry run writes nothing
    default = _gpu_check("--dry-run")
    assert "benchmarks/results/gpu-" in default.stdout


def test_gpu_check_bad_flag(tmp_path):
    r = _gpu_check("--fast")
    assert r.returncode == 2
    assert (r.stdout + r.stderr).strip() == \
        "gpu_check: unknown argument '--fast' (expected --dry-run, --skip-build, --out DIR or --help)"


def test_bench_has_the_quick_flag_the_script_uses():
    from fastkd.cli import build_parser

    args = build_parser().parse_args(["bench", "--device", "cuda", "--quick", "--min-time", "0.1"])
    assert args.quick and args.device == "cuda" and args.min_time == 0.1
