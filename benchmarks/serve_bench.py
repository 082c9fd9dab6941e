"""Throughput and latency of `fastkd serve-teacher` against Seldon MLServer, same model, one run.

Both servers serve the bundled digits teacher (saved as TorchScript, run by torch under
``inference_mode`` with the same number of threads) on 127.0.0.1; one asyncio load generator
(aiohttp) keeps CONCURRENCY requests of BATCH samples in flight for DURATION seconds and
reports samples/s and the p50/p99 latency of a request. Requests are JSON for both servers;
fastkd is also measured with binary tensors (the extension MLServer does not announce).

    python benchmarks/serve_bench.py --mlserver /path/to/venv/bin/mlserver

MLServer is not a dependency of fastkd: install it in a separate environment
(``python -m venv mls && mls/bin/pip install mlserver``); its runtime imports torch from
this environment. Without ``--mlserver`` only fastkd is measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

RUNTIME = '''
import sys
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceResponse


class TorchSoftmax(MLModel):
    async def load(self):
        extra = self.settings.parameters.extra
        try:
            import torch
        except ImportError:
            sys.path.append(extra["torch_path"])
            import torch
        torch.set_num_threads(int(extra["threads"]))
        self.torch = torch
        self.model = torch.jit.load(self.settings.parameters.uri).eval()
        return True

    async def predict(self, payload):
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        with self.torch.inference_mode():
            p = self.torch.softmax(self.model(self.torch.from_numpy(x)), 1).numpy()
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", p)])
'''


def _wait_ready(url: str, proc, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                out = proc.stdout.read() if proc.stdout else ""
                raise RuntimeError(f"server did not start ({url}):\n{out[-2000:]}")
            time.sleep(0.3)


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def _load(url: str, body: bytes, headers: dict, concurrency: int, duration: float, warmup: float):
    import aiohttp
    lat, stop_at = [], [0.0]
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one(record: bool):
            t = time.perf_counter()
            async with s.post(url, data=body, headers=headers) as r:
                data = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
            if record:
                lat.append(time.perf_counter() - t)

        async def worker(until: float, record: bool):
            while time.perf_counter() < until:
                await one(record)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker(t0 + warmup, False) for _ in range(concurrency)])
        t1 = time.perf_counter()
        await asyncio.gather(*[worker(t1 + duration, True) for _ in range(concurrency)])
        stop_at[0] = time.perf_counter() - t1
    return np.array(lat), stop_at[0]


def measure(url: str, x: np.ndarray, binary: bool, concurrency: int, duration: float, warmup: float) -> dict:
    from fastkd import oip
    body, headers = oip.encode_request([("input", "FP32", x)], outputs=["probabilities"], binary=binary,
                                       binary_output=binary)
    lat, wall = asyncio.run(_load(url, body, headers, concurrency, duration, warmup))
    return {"samples": len(lat) * x.shape[0], "seconds": wall, "latencies": lat}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlserver", help="the `mlserver` executable of a separate environment")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated (default: %(default)s)")
    p.add_argument("--batch", default="1,64", help="samples per request, comma-separated (default: %(default)s)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per cell (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per cell and server (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server (default: %(default)s)")
    p.add_argument("--batch-delay-ms", type=float, default=2.0, help="fastkd --batch-delay-ms (default: %(default)s)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    import torch

    from fastkd.methods.mekd import digits_teacher
    from fastkd.serve import free_port

    concs = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    model, info = digits_teacher()
    shape = list(info["input_shape"])
    tmp = tempfile.mkdtemp(prefix="serve_bench_")
    ts = os.path.join(tmp, "digits.pt")
    torch.jit.trace(model.eval(), torch.zeros([1] + shape), check_trace=False).save(ts)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal([b] + shape).astype(np.float32) for b in batches}
    results = []
    servers, procs = [], []  # (label, infer url, binary)

    def start(cmd, ready, **kw):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        procs.append(proc)
        _wait_ready(ready, proc)

    try:
        port = free_port()
        start([sys.executable, "-m", "fastkd", "serve-teacher", ts, "--input-shape", ",".join(map(str, shape)),
               "--port", str(port), "--name", "digits", "--batch-delay-ms", str(args.batch_delay_ms),
               "--max-batch", "1024"], f"http://127.0.0.1:{port}/v2/health/ready")
        url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
        servers += [("fastkd (json)", url, False), ("fastkd (binary)", url, True)]
        if args.mlserver:
            port, gport, mport = free_port(), free_port(), free_port()
            with open(os.path.join(tmp, "runtime.py"), "w") as f:
                f.write(RUNTIME)
            with open(os.path.join(tmp, "settings.json"), "w") as f:
                # parallel_workers 0: inference in the server process (MLServer 1.7's worker pool
                # does not start with recent uvloop releases)
                json.dump({"host": "127.0.0.1", "http_port": port, "grpc_port": gport, "metrics_port": mport,
                           "parallel_workers": 0, "debug": False}, f)
            with open(os.path.join(tmp, "model-settings.json"), "w") as f:
                json.dump({"name": "digits", "implementation": "runtime.TorchSoftmax",
                           "parameters": {"uri": ts, "extra": {
                               "torch_path": os.path.dirname(os.path.dirname(torch.__file__)),
                               "threads": args.threads}},
                           "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1] + shape}],
                           "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}, f)
            start([args.mlserver, "start", tmp], f"http://127.0.0.1:{port}/v2/models/digits/ready", cwd=tmp)
            servers.append(("mlserver (json)", f"http://127.0.0.1:{port}/v2/models/digits/infer", False))
        # cells are measured in turn, server after server, `--repeats` times, so that a change
        # of load on the machine affects every server alike
        for b in batches:
            for c in concs:
                acc = {name: [] for name, _, _ in servers}
                for _ in range(args.repeats):
                    for name, url, binary in servers:
                        acc[name].append(measure(url, xs[b], binary, c, args.duration, args.warmup))
                for name, _, _ in servers:
                    rs = acc[name]
                    lat = np.concatenate([r["latencies"] for r in rs])
                    r = {"server": name, "batch": b, "concurrency": c,
                         "samples_per_s": sum(r["samples"] for r in rs) / sum(r["seconds"] for r in rs),
                         "requests": int(len(lat)), "p50_ms": 1000 * float(np.percentile(lat, 50)),
                         "p99_ms": 1000 * float(np.percentile(lat, 99))}
                    results.append(r)
                    print(f"{name:<16} batch {b:>3} conc {c:>3}: {r['samples_per_s']:>9.0f} samples/s  "
                          f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms", flush=True)
    finally:
        for proc in procs:
            _stop(proc)

    print("\n| server | batch | concurrency | samples/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['server']} | {r['batch']} | {r['concurrency']} | {r['samples_per_s']:.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
