"""Health-check latency of `fastkd serve-teacher` while large requests are in flight.

Starts the server (digits teacher, default 64 MiB body limit) and, while a second client
polls ``GET /v2/health/ready`` every 5 ms, sends

1. a 200 MB body announced by its Content-Length (refused with 413 before it is read);
2. a 200 MB body streamed with chunked transfer encoding (refused once 64 MiB are read);
3. a valid ~50 MB JSON request (under the limit, parsed off the event loop).

Prints, per case, the status, the seconds until the answer, the health checks made and
their median and worst latency, and the server's resident memory after the case.

    python benchmarks/serve_limits.py
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _poll(port, stop, lat):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        t = time.perf_counter()
        c.request("GET", "/v2/health/ready")
        c.getresponse().read()
        lat.append(time.perf_counter() - t)
        time.sleep(0.005)
    c.close()


def _raw(port, head: bytes, chunks) -> tuple[str, float]:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    t = time.perf_counter()
    s.sendall(head)
    try:
        for ch in chunks:
            s.sendall(ch)
    except OSError:
        pass  # the server answered and closed while we were still sending
    try:
        status = s.recv(200).split(b"\r\n")[0].decode()
    except OSError as e:
        status = f"({e})"
    s.close()
    return status, time.perf_counter() - t


def main() -> int:
    from fastkd.serve import free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "fastkd", "serve-teacher", "digits", "--port", str(port),
                          "--max-batch", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/v2/health/ready")
                break
            except OSError:
                if time.monotonic() - t0 > 120 or p.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.2)
        time.sleep(0.5)
        print(f"server RSS at start: {_rss_mb(p.pid):.0f} MB")
        mb = 2 ** 20
        block = b" " * mb
        n = 200_000_000 // mb
        x = np.random.default_rng(0).standard_normal((50_000_000 // (64 * 11), 1, 8, 8)).astype(np.float32)
        from fastkd import oip
        body, _ = oip.encode_request([("input", "FP32", x)])
        cases = [
            ("200 MB, Content-Length", lambda: _raw(
                port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % (n * mb), (block for _ in range(n)))),
            ("200 MB, chunked", lambda: _raw(
                port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                (b"%x\r\n" % mb + block + b"\r\n" for _ in range(n)))),
            (f"{len(body) / 1e6:.0f} MB valid JSON", lambda: _raw(
                port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body), [body])),
        ]
        rows = []
        for name, fn in cases:
            stop, lat = threading.Event(), []
            th = threading.Thread(target=_poll, args=(port, stop, lat))
            th.start()
            time.sleep(0.1)
            status, secs = fn()
            time.sleep(0.1)
            stop.set()
            th.join(60)
            lat = np.array(lat) * 1000
            rows.append((name, status, secs, len(lat), float(np.median(lat)), float(lat.max()), _rss_mb(p.pid)))
            print(f"{name:<26} {status:<28} answer after {secs:6.2f} s; {len(lat)} health checks, "
                  f"median {np.median(lat):.1f} ms, worst {lat.max():.1f} ms; server RSS {rows[-1][-1]:.0f} MB",
                  flush=True)
        print(json.dumps(rows))
    finally:
        p.terminate()
        p.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
