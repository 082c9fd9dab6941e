"""The source distribution holds everything the extension needs to compile."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sdist_contains_every_source_and_header(tmp_path):
    # build from a copy of the tracked files: a checkout's *.egg-info/SOURCES.txt would
    # otherwise add files that MANIFEST.in misses
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout to list the tracked files")
    src = tmp_path / "src"
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    env = dict(os.environ, FASTKD_NO_CUDA="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (archive,) = glob.glob(str(tmp_path / "dist" / "*.tar.gz"))
    with tarfile.open(archive) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = [f for f in files if f.startswith("csrc/") and f.rsplit(".", 1)[-1] in ("h", "cuh", "cpp", "cu")]
    assert any(w.endswith(".h") for w in wanted) and any(w.endswith(".cuh") for w in wanted)
    assert [w for w in wanted if w not in names] == []
    assert "fastkd/assets/digits_cnn.pt" in names
