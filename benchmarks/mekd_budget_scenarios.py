"""Two end-to-end budget scenarios of `fastkd distill --method mekd` against `fastkd serve-teacher`.

1. *Server killed mid-run*: the server is killed with SIGKILL while a request is out (a
   ledger row in state 'sent') and restarted a second later; the client retries through the restart (a request lost
   with the server is charged: its fate is unknown), finishes, and a rerun of the same
   command finishes again without paying.
2. *Two identical runs at once* sharing one cache file and one budget.

For each, prints the exit status of every run, the queries the ledger charged, the distinct
answers in the cache and the samples in each run's transfer set.

    python benchmarks/mekd_budget_scenarios.py [--budget 3000] [--gan-steps 40]
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request


def _server(port: int):
    p = subprocess.Popen([sys.executable, "-m", "fastkd", "serve-teacher", "digits", "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return p
        except OSError:
            if time.monotonic() - t0 > 120:
                raise RuntimeError("serve-teacher did not start")
            time.sleep(0.2)


def _client(port: int, args, cache: str, out: str):
    cmd = [sys.executable, "-m", "fastkd", "distill", "--method", "mekd", "--teacher-url",
           f"http://127.0.0.1:{port}/v2/models/digits", "--budget", str(args.budget), "--cache", cache,
           "--gan-steps", str(args.gan_steps), "--epochs", str(args.epochs), "--max-batch", "50",
           "--retries", "50", "--timeout", "10", "--out", out, "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd


def _ledger(cache: str):
    c = sqlite3.connect(cache, timeout=60)
    try:
        paid = c.execute("SELECT COALESCE(SUM(n), 0) FROM ledger WHERE state='paid'").fetchone()[0]
        distinct = c.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:  # the client has not created its tables yet
        return 0, 0
    finally:
        c.close()
    return paid, distinct


def _in_flight(cache: str) -> bool:
    c = sqlite3.connect(cache, timeout=60)
    try:
        return c.execute("SELECT COUNT(*) FROM ledger WHERE state='sent'").fetchone()[0] > 0
    finally:
        c.close()


def _transfer(out: str):
    try:
        with open(os.path.join(out, "summary.json")) as f:
            return sum(json.load(f)["results"]["mekd"]["transfer_set"].values())
    except (OSError, KeyError, ValueError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=3000)
    ap.add_argument("--gan-steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--kill-after", type=float, default=1.0, help="seconds after the first answer")
    args = ap.parse_args(argv)
    from fastkd.serve import free_port

    tmp = tempfile.mkdtemp(prefix="mekd_budget_")
    port = free_port()
    # 1. server killed mid-run
    cache = os.path.join(tmp, "killed.sqlite")
    srv = _server(port)
    cli, cmd = _client(port, args, cache, os.path.join(tmp, "killed"))
    print("client:", " ".join(cmd[1:]))
    t0 = time.monotonic()
    while not os.path.exists(cache) or _ledger(cache)[0] == 0:
        time.sleep(0.05)
        if time.monotonic() - t0 > 300:
            raise RuntimeError("no paid answer within 300 s")
    time.sleep(args.kill_after)
    while not _in_flight(cache):  # kill the server while a request is out
        time.sleep(0.0005)
    srv.kill()
    srv.wait()
    paid_at_kill = _ledger(cache)
    time.sleep(1.0)
    srv = _server(port)
    out = cli.communicate(timeout=1800)[0]
    print(f"[killed] server killed at {paid_at_kill[0]} paid; first run exit {cli.returncode}; "
          f"ledger paid {_ledger(cache)[0]}, distinct answers {_ledger(cache)[1]}, "
          f"transfer set {_transfer(os.path.join(tmp, 'killed'))}")
    if cli.returncode:
        print(out[-2000:])
    cli, _ = _client(port, args, cache, os.path.join(tmp, "killed2"))
    out = cli.communicate(timeout=1800)[0]
    print(f"[killed] rerun exit {cli.returncode}; ledger paid {_ledger(cache)[0]}, distinct answers "
          f"{_ledger(cache)[1]}, transfer set {_transfer(os.path.join(tmp, 'killed2'))}")
    if cli.returncode:
        print(out[-2000:])
    # 2. two identical runs at once, one cache
    cache = os.path.join(tmp, "shared.sqlite")
    runs = [_client(port, args, cache, os.path.join(tmp, f"shared{j}"))[0] for j in range(2)]
    outs = [r.communicate(timeout=1800)[0] for r in runs]
    paid, distinct = _ledger(cache)
    print(f"[two clients] exit {[r.returncode for r in runs]}; ledger paid {paid}, distinct answers {distinct}, "
          f"transfer sets {[_transfer(os.path.join(tmp, f'shared{j}')) for j in range(2)]}")
    for r, o in zip(runs, outs):
        if r.returncode:
            print(o[-2000:])
    srv.terminate()
    srv.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
