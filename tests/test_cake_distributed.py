"""Synthesis sharding and DDP student training over 2 CPU processes (gloo)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastkd import distill, models
from fastkd.synthesis import cake

KW = dict(num_classes=10, input_shape=(1, 8, 8), num_samples=50, batch_size=10, steps=2, lr=(1e-2, 1e-3),
          progress=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _teacher():
    torch.manual_seed(0)
    return models.create("cnn", num_classes=10, in_channels=1, width=0.25).eval()


def _worker(rank, world, init_file, out_dir, ret_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher = _teacher()
        gathered = cake(teacher, **KW)
        sharded = cake(teacher, out_dir=out_dir, **KW)
        torch.manual_seed(0)
        student = models.create("cnn_half", width=0.25)
        h = distill.train_student(student, gathered, epochs=2, batch_size=8, lr=0.05, progress=False)
        torch.save({"inputs": gathered.inputs, "sharded": sharded.inputs, "done": gathered.meta["batches_done_here"],
                    "world": h.config["world_size"], "params": [p.detach() for p in student.parameters()]},
                   os.path.join(ret_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_sharding_and_ddp(tmp_path):
    init = str(tmp_path / "init")
    out, ret = str(tmp_path / "out"), str(tmp_path / "ret")
    os.makedirs(ret)
    mp.start_processes(_worker, args=(2, init, out, ret), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(os.path.join(ret, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(ret, "rank1.pt"), weights_only=True)
    assert r0["done"] == 3 and r1["done"] == 2  # 5 batches: 0, 2, 4 and 1, 3
    single = cake(_teacher(), **KW)
    for r in (r0, r1):  # no batch lost or done twice: the union is the single-process data set
        assert torch.allclose(r["inputs"], single.inputs, atol=1e-6)
        assert torch.allclose(r["sharded"], single.inputs, atol=1e-6)
    assert sorted(f for f in os.listdir(out) if f.startswith("batch_")) == [f"batch_{b:06d}.pt" for b in range(5)]
    assert r0["world"] == 2
    for a, b in zip(r0["params"], r1["params"]):  # DDP keeps the replicas identical
        assert torch.equal(a, b)


def test_torchrun_cli_synthesize(tmp_path):
    out = str(tmp_path / "syn")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "fastkd", "synthesize", "--teacher", "digits", "--num-samples", "40", "--batch-size", "10",
           "--steps", "2", "--out", out, "--no-grid", "--quiet", "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["num_batches"] == 4
    from fastkd.synthesis import SyntheticDataset

    ds = SyntheticDataset.load(os.path.join(out, "dataset.pt"))
    assert len(ds) == 40
