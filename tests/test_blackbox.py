"""BlackBoxTeacher: local and remote (Open Inference Protocol) teachers, budget, cache, faults.

Servers are started on 127.0.0.1 only; every request loop is bounded."""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from fastkd.blackbox import (BlackBoxTeacher, QueryBudgetExceeded, TeacherInputError, TeacherRequestError,
                             TeacherUnavailable)

starlette = pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from fastkd.serve import ServerThread, create_app, free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from serving import SHAPE, Slow, ref_probs, stop, tiny_model  # noqa: E402


class Counting:
    """A local black box that counts the samples it answers."""

    def __init__(self, model):
        self.model, self.n, self.calls = model, 0, 0
        self.lock = threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.n += x.shape[0]
            self.calls += 1
        return self.model(x)


# ----------------------------------------------------------------------------- local
def test_local_soft_hard_and_no_gradients():
    m = tiny_model()
    x = torch.randn(7, *SHAPE, requires_grad=True)
    soft = BlackBoxTeacher(m, response="soft")(x)
    hard = BlackBoxTeacher(m, response="hard")(x)
    ref = ref_probs(m, x)
    torch.testing.assert_close(soft, ref)
    assert not soft.requires_grad and soft.dtype == torch.float32
    assert torch.equal(hard.argmax(1), ref.argmax(1)) and torch.equal(hard.sum(1), torch.ones(7))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}


def test_budget_raises_before_sending_and_cache_dedup():
    f = Counting(tiny_model())
    bb = BlackBoxTeacher(f, budget=10, max_batch=3)
    x = torch.randn(6, *SHAPE)
    bb(x)
    assert f.n == 6 and f.calls == 2
    bb(torch.cat([x, x]))  # all cached: free
    assert f.n == 6 and bb.stats()["cache_hits"] == 12
    with pytest.raises(QueryBudgetExceeded, match="needs 5 paid queries but only 4"):
        bb(torch.randn(5, *SHAPE))
    assert f.n == 6  # nothing was sent
    y = torch.randn(1, *SHAPE)
    bb(torch.cat([y, y, y, y]))  # duplicates inside one call are paid once
    s = bb.stats()
    assert f.n == 7 and s["queries_paid"] == 7 and s["budget_left"] == 3


def test_bad_arguments():
    m = tiny_model()
    with pytest.raises(ValueError, match="response"):
        BlackBoxTeacher(m, response="medium")
    with pytest.raises(ValueError, match="exactly one"):
        BlackBoxTeacher(m, url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="budget"):
        BlackBoxTeacher(m, budget=-1)
    with pytest.raises(ValueError, match="max_batch"):
        BlackBoxTeacher(m, max_batch=0)
    bb = BlackBoxTeacher(m)
    with pytest.raises(TeacherInputError, match="NaN"):
        bb(torch.full((2, *SHAPE), float("nan")))
    with pytest.raises(TeacherInputError, match="batch dimension"):
        bb(torch.randn(16))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        bb([1.0, 2.0])


def test_persistent_cache_and_budget_across_runs(tmp_path):
    db = tmp_path / "cache.sqlite"
    f = Counting(tiny_model())
    x = torch.randn(8, *SHAPE)
    with BlackBoxTeacher(f, budget=10, cache=db, name="t") as bb:
        a = bb(x)
    with BlackBoxTeacher(f, budget=10, cache=db, name="t") as bb:  # a rerun: pays nothing
        b = bb(x)
        assert bb.stats()["queries_paid"] == 0 and bb.stats()["queries_paid_total"] == 8
        with pytest.raises(QueryBudgetExceeded):  # the budget remembers the first run
            bb(torch.randn(3, *SHAPE))
        bb(torch.randn(2, *SHAPE))
        assert bb.budget_left == 0
    torch.testing.assert_close(a, b)
    assert f.n == 10


def test_budget_exact_under_concurrency(tmp_path):
    f = Counting(tiny_model())
    bb = BlackBoxTeacher(f, budget=50, max_batch=4, cache=tmp_path / "c.sqlite", name="t")
    ok, refused = [], []

    def worker(i):
        try:
            bb(torch.randn(10, *SHAPE, generator=torch.Generator().manual_seed(100 + i)))
            ok.append(i)
        except QueryBudgetExceeded:
            refused.append(i)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(9)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    assert len(ok) == 5 and len(refused) == 4
    assert f.n == 50 and bb.stats()["queries_paid_total"] == 50


# ----------------------------------------------------------------------------- remote
@pytest.fixture
def served():
    """(model, server) for soft responses, on 127.0.0.1."""
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", response="soft", max_batch=64)
    with ServerThread(app) as srv:
        yield m, srv, app


def test_remote_soft_matches_model_and_counts_bytes(served):
    m, srv, app = served
    bb = BlackBoxTeacher(url=srv.url + "/v2/models/tiny", response="soft", max_batch=5, workers=2)
    x = torch.randn(12, *SHAPE)
    y = bb(x)
    torch.testing.assert_close(y, ref_probs(m, x), atol=1e-6, rtol=1e-5)
    s = bb.stats()
    assert s["queries_paid"] == 12 and s["requests"] == 3
    assert app.state.stats["inference_count"] == 12
    assert s["bytes_sent"] > 12 * 16 * 4 and s["bytes_received"] > 12 * 10 * 4
    assert bb.metadata()["inputs"][0]["shape"] == [-1] + SHAPE


def test_local_float32_softmax_module_answers_bit_identical_to_server(served):
    """The server sends a float32 softmax as 9-digit JSON: a local module computing the same
    softmax (outputs="probs") gets the same bits, so local and HTTP runs can be compared
    exactly (docs/mekd.md); the logits path (float64 softmax) differs only by rounding."""
    m, srv, _ = served

    class Softmax(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(m(x).float(), 1)

    x = torch.randn(40, *SHAPE) * 3
    remote = BlackBoxTeacher(url=srv.url + "/v2/models/tiny", response="soft", max_batch=16)(x)
    local = BlackBoxTeacher(Softmax(), response="soft", outputs="probs")(x)
    assert torch.equal(local, remote)
    from_logits = BlackBoxTeacher(m, response="soft")(x)
    assert (from_logits - remote).abs().max().item() < 1e-6


def test_remote_hard_labels_and_client_side_hard(served):
    m, srv, _ = served
    x = torch.randn(9, *SHAPE)
    hard = BlackBoxTeacher(url=srv.url, model_name="tiny", response="hard")(x)
    assert torch.equal(hard.argmax(1), ref_probs(m, x).argmax(1))
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", response="hard")
    with ServerThread(app) as srv2:
        bb = BlackBoxTeacher(url=srv2.url, model_name="tiny", response="soft")  # server gives labels only
        lab = bb(x)
        assert torch.equal(lab, hard) and bb.num_classes == 10


def test_inputs_checked_against_metadata_before_paying(served):
    _, srv, app = served
    bb = BlackBoxTeacher(url=srv.url, model_name="tiny", budget=100)
    with pytest.raises(TeacherInputError, match=r"do not match the model's input 'input' of shape \[-1, 1, 4, 4\]"):
        bb(torch.randn(3, 1, 5, 5))
    assert app.state.stats["inference_count"] == 0 and bb.stats()["queries_paid_total"] == 0
    with pytest.raises(TeacherRequestError, match="404"):
        BlackBoxTeacher(url=srv.url, model_name="nope").metadata()


class Faults:
    """ASGI wrapper answering infer requests from a script of faults, then normally."""

    def __init__(self, app, plan):
        self.app, self.plan, self.seen = app, list(plan), []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/infer") and self.plan:
            fault = self.plan.pop(0)
            self.seen.append(fault)
            if fault == "slow":
                await asyncio.sleep(1.5)
            elif fault != "ok":
                status, body = {"500": (500, b'{"error": "boom"}'), "503": (503, b'{"error": "busy"}'),
                                "429": (429, b'{"error": "slow down"}'),
                                "malformed": (200, b'{"outputs": [{"name": "probabilities", "data'),
                                "wrongshape": (200, json.dumps({"outputs": [{
                                    "name": "probabilities", "datatype": "FP32", "shape": [1, 7],
                                    "data": [0.1] * 7}]}).encode()),
                                "nan": (200, b'{"outputs": [{"name": "probabilities", "datatype": "FP32", '
                                             b'"shape": [1, 2], "data": [NaN, 1]}]}'),
                                }[fault]
                headers = [(b"content-type", b"application/json")]
                if fault == "429":
                    headers.append((b"retry-after", b"0"))
                while True:  # drain the request
                    msg = await receive()
                    if not msg.get("more_body"):
                        break
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@pytest.mark.parametrize("fault,billed", [("500", 0), ("503", 0), ("429", 0), ("malformed", 1),
                                          ("wrongshape", 1), ("nan", 1), ("slow", 1)])
def test_fault_retried_and_accounted(fault, billed):
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny")
    fa = Faults(app, [fault, fault])
    with ServerThread(fa) as srv:
        bb = BlackBoxTeacher(url=srv.url, model_name="tiny", timeout=0.5, retries=3, backoff=0.01,
                             budget=100)
        x = torch.randn(4, *SHAPE)
        y = bb(x)
        torch.testing.assert_close(y, ref_probs(m, x), atol=1e-6, rtol=1e-5)
        s = bb.stats()
        assert s["retries"] == 2 and fa.seen == [fault, fault]
        # failed attempts count as paid only when the server answered them (or may have)
        assert s["queries_paid_total"] == 4 + 2 * 4 * billed


def test_retries_run_out_with_clear_message_and_budget_runs_out_while_retrying(tmp_path):
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny")
    with ServerThread(Faults(app, ["500"] * 3)) as srv:
        bb = BlackBoxTeacher(url=srv.url, model_name="tiny", retries=2, backoff=0.01)
        with pytest.raises(TeacherUnavailable, match="failed 3 attempts.*HTTP 500: boom.*rerun to resume"):
            bb(torch.randn(2, *SHAPE))
        assert bb.stats()["queries_paid_total"] == 0
    with ServerThread(Faults(app, ["malformed"] * 5)) as srv:
        bb = BlackBoxTeacher(url=srv.url, model_name="tiny", retries=5, backoff=0.01, budget=5)
        with pytest.raises(QueryBudgetExceeded, match="retry needs 2 paid queries but only 1"):
            bb(torch.randn(2, *SHAPE))
        assert bb.stats()["queries_paid_total"] == 4


def test_server_down_then_resume_from_cache(tmp_path):
    m = tiny_model()
    db = tmp_path / "c.sqlite"
    port = free_port()
    x = torch.randn(12, *SHAPE)
    app1 = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny")
    srv = ServerThread(app1, port=port).start()
    bb = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=db, budget=12, retries=1, backoff=0.01,
                         max_batch=4)
    bb(x[:8])
    srv.stop()
    with pytest.raises(TeacherUnavailable, match="cannot connect"):
        bb(x)
    assert bb.stats()["queries_paid_total"] == 8  # refused connections are not paid
    app2 = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny")
    with ServerThread(app2, port=port):
        y = BlackBoxTeacher(url=f"http://127.0.0.1:{port}", model_name="tiny", cache=db, budget=12)(x)
    torch.testing.assert_close(y, ref_probs(m, x), atol=1e-6, rtol=1e-5)
    assert app1.state.stats["inference_count"] + app2.state.stats["inference_count"] == 12


CLIENT = r"""
import sys, torch
from fastkd.blackbox import BlackBoxTeacher
url, db = sys.argv[1], sys.argv[2]
bb = BlackBoxTeacher(url=url, model_name="teacher", cache=db, budget=60, max_batch=2, retries=50, backoff=0.05,
                     backoff_max=0.2, timeout=5)
x = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
for i in range(0, 40, 2):
    bb(x[i:i + 2])
    print("done", i + 2, flush=True)
"""


def _start_cli_server(model_path, port):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "fastkd", "serve-teacher", str(model_path), "--port", str(port),
                          "--host", "127.0.0.1", "--input-shape", "1,4,4"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    import urllib.request
    while time.monotonic() - t0 < 240:  # bounded; slow only on a loaded machine
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return p
        except OSError:
            if p.poll() is not None:
                raise RuntimeError(p.stdout.read())
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("serve-teacher did not start")


def _served_count(port):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/teacher/stats", timeout=5) as r:
        return json.loads(r.read())["model_stats"][0]["inference_count"]


@pytest.mark.slow
def test_server_killed_and_client_killed_mid_run_budget_never_exceeded(tmp_path):
    """The real CLI server is killed mid-run and restarted; then the client is killed mid-run
    and resumed. No paid answer is lost and the server never answers more than the budget."""
    m = tiny_model()
    path = tmp_path / "tiny.pt"
    torch.jit.script(m).save(str(path))
    db = str(tmp_path / "c.sqlite")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    served = 0
    srv = _start_cli_server(path, port)
    cli = subprocess.Popen([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}", db], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = cli.stdout.readline()  # wait for the first paid answers
        assert line.startswith("done"), line + cli.stdout.read() if cli.poll() is not None else line
        time.sleep(0.3)
        served += _served_count(port)
        srv.kill()  # the server dies mid-run; the client keeps retrying
        srv.wait(10)
        time.sleep(0.5)
        srv = _start_cli_server(path, port)
        for _ in range(3):  # wait for progress after the restart (bounded: the client stops by itself)
            line = cli.stdout.readline()
            if not line:
                break
        cli.kill()  # the client dies mid-run
        cli.wait(10)
        time.sleep(0.2)
        # resume in this process from the same cache: only the missing answers are paid
        x = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
        bb = BlackBoxTeacher(url=f"http://127.0.0.1:{port}", model_name="teacher", cache=db, budget=60)
        y = bb(x)
        torch.testing.assert_close(y, ref_probs(m, x), atol=1e-6, rtol=1e-5)
        served += _served_count(port)
        s = bb.stats()
        assert 40 <= served <= 60, served
        assert s["queries_paid_total"] <= 60 and s["queries_reserved_total"] <= 60
        assert s["queries_paid_total"] >= served  # every sample the server answered is accounted for
        assert s["cached_answers"] == 40
    finally:
        for p in (srv, cli):
            if p.poll() is None:
                p.kill()
                p.wait(10)


TRITON_CLIENT = r"""
import sys, json, numpy as np
import tritonclient.http as httpclient
c = httpclient.InferenceServerClient(url=sys.argv[1])
assert c.is_server_live() and c.is_model_ready("tiny")
meta = c.get_model_metadata("tiny")
x = np.load(sys.argv[2])
inp = httpclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x, binary_data=False)
res = c.infer("tiny", [inp], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
np.save(sys.argv[3], res.as_numpy("probabilities"))
print(json.dumps(meta))
"""


def test_tritonclient_against_our_server(served, tmp_path):
    pytest.importorskip("tritonclient.http")
    m, srv, _ = served
    x = torch.randn(5, *SHAPE)
    np.save(tmp_path / "x.npy", x.numpy())
    out = subprocess.run([sys.executable, "-c", TRITON_CLIENT, f"127.0.0.1:{srv.port}", str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    y = torch.from_numpy(np.load(tmp_path / "y.npy"))
    torch.testing.assert_close(y, ref_probs(m, x), atol=1e-6, rtol=1e-5)
    assert json.loads(out.stdout.strip().splitlines()[-1])["inputs"][0]["name"] == "input"


MLSERVER_RUNTIME = '''
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceResponse


class LinearSoftmax(MLModel):
    async def load(self):
        d = np.load(self.settings.parameters.uri)
        self.w, self.b = d["w"], d["b"]
        return True

    async def predict(self, payload):
        x = NumpyCodec.decode_input(payload.inputs[0])
        z = x.reshape(x.shape[0], -1) @ self.w.T + self.b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output("probabilities", p.astype(np.float32))])
'''


@pytest.mark.skipif(not os.environ.get("FASTKD_MLSERVER"),
                    reason="set FASTKD_MLSERVER to an `mlserver` executable (MLServer is not a test dependency)")
def test_our_client_against_mlserver(tmp_path):
    """Interoperability: BlackBoxTeacher against Seldon MLServer (an independent implementation)."""
    import urllib.request
    m = tiny_model()
    w, b = m[1].weight.detach().numpy(), m[1].bias.detach().numpy()
    np.savez(tmp_path / "w.npz", w=w, b=b)
    (tmp_path / "runtime.py").write_text(MLSERVER_RUNTIME)
    port, gport, mport = free_port(), free_port(), free_port()
    (tmp_path / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": gport, "metrics_port": mport,
        "parallel_workers": 0, "debug": False}))
    (tmp_path / "model-settings.json").write_text(json.dumps({
        "name": "tiny", "implementation": "runtime.LinearSoftmax",
        "parameters": {"uri": str(tmp_path / "w.npz")},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1] + SHAPE}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}))
    p = subprocess.Popen([os.environ["FASTKD_MLSERVER"], "start", str(tmp_path)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/tiny/ready", timeout=1)
                break
            except OSError:
                if p.poll() is not None or time.monotonic() - t0 > 120:
                    raise RuntimeError("mlserver did not start")
                time.sleep(0.5)
        bb = BlackBoxTeacher(url=f"http://127.0.0.1:{port}/v2/models/tiny", response="soft", budget=20, max_batch=4)
        x = torch.randn(10, *SHAPE)
        torch.testing.assert_close(bb(x), ref_probs(m, x), atol=1e-5, rtol=1e-4)
        assert bb.stats()["queries_paid"] == 10
        with pytest.raises(TeacherInputError):
            bb(torch.randn(2, 1, 5, 5))
        hard = BlackBoxTeacher(url=f"http://127.0.0.1:{port}", model_name="tiny", response="hard")(x)
        assert torch.equal(hard.argmax(1), ref_probs(m, x).argmax(1))
    finally:
        stop(p)


class NoExtensions:
    """Wraps an app so that ``GET /v2`` announces no protocol extension and every request
    with binary tensors is refused, like a JSON-only server; records the content types."""

    def __init__(self, app):
        self.app, self.types = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            h = dict(scope["headers"])
            if scope["path"] == "/v2":
                body = json.dumps({"name": "jsononly", "version": "0", "extensions": []}).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            if scope["method"] == "POST":
                self.types.append(h.get(b"content-type", b"").decode())
                if b"inference-header-content-length" in h:
                    await send({"type": "http.response.start", "status": 400, "headers": []})
                    await send({"type": "http.response.body", "body": b'{"error": "binary not supported"}'})
                    return
        await self.app(scope, receive, send)


def test_client_uses_binary_when_announced_and_json_otherwise(served):
    m, srv, _ = served
    x = torch.randn(32, *SHAPE)
    ref = ref_probs(m, x)
    auto = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=False)
    torch.testing.assert_close(auto(x), ref, atol=1e-6, rtol=1e-5)
    assert auto.binary is True
    forced = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=False, binary=False)
    torch.testing.assert_close(forced(x), ref, atol=1e-6, rtol=1e-5)
    sb, sj = auto.stats(), forced.stats()
    # binary: 4 bytes per float each way; JSON floats take 9 significant digits
    assert sb["bytes_sent"] < 32 * 16 * 4 + 1000 < sj["bytes_sent"]
    assert sb["bytes_received"] < 32 * 10 * 4 + 1000 < sj["bytes_received"]
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny")
    wrapped = NoExtensions(app)
    with ServerThread(wrapped) as srv2:
        bb = BlackBoxTeacher(url=srv2.url, model_name="tiny", cache=False)
        torch.testing.assert_close(bb(x), ref, atol=1e-6, rtol=1e-5)
        assert bb.binary is False and wrapped.types == ["application/json"]
        assert bb.stats()["bytes_sent"] > 32 * 16 * 4
        with pytest.raises(TeacherRequestError, match="binary not supported"):
            BlackBoxTeacher(url=srv2.url, model_name="tiny", cache=False, binary=True)(x)
    with pytest.raises(ValueError, match="binary must be"):
        BlackBoxTeacher(url=srv.url, model_name="tiny", binary="yes")


def test_client_hard_labels_from_a_binary_server():
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", response="hard")
    x = torch.randn(9, *SHAPE)
    with ServerThread(app) as srv:
        bb = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=False)
        y = bb(x)
        assert bb.binary is True
    assert torch.equal(y.argmax(1), ref_probs(m, x).argmax(1)) and torch.equal(y.sum(1), torch.ones(9))


# ----------------------------------------------------------------------------- budget: lost requests, shared caches
def _lose_answers(bb, which, exc=None):
    """Make the transport of ``bb`` lose the answer of the inference requests numbered in
    ``which`` (1-based): the server answers them, the client never sees it."""
    from fastkd.blackbox.errors import _Attempt
    orig, count = bb._t.request, [0]

    def request(method, path, body, timeout, extra=None):
        out = orig(method, path, body, timeout, extra)
        if method == "POST":
            count[0] += 1
            if count[0] in which:
                if exc is not None:
                    raise exc
                raise _Attempt("connection", "connection lost before the answer (simulated)", billed=True)
        return out
    bb._t.request = request


def test_lost_request_never_strands_the_run_and_resume_pays_nothing(tmp_path):
    from fastkd.methods.mekd import query_planned
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny")
    db = tmp_path / "c.sqlite"
    x = torch.randn(40, *SHAPE, generator=torch.Generator().manual_seed(3))
    with ServerThread(app) as srv:
        bb = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=db, budget=40, retries=3, backoff=0.01)
        _lose_answers(bb, {2})
        xd, t = query_planned(bb, x, 8)  # the lost request is charged: 32 of the 40 planned fit
        assert xd.shape[0] == 32 and torch.equal(xd, x[:32])
        torch.testing.assert_close(t, ref_probs(m, xd), atol=1e-6, rtol=1e-5)
        s = bb.stats()
        assert s["queries_paid_total"] == 40 == app.state.stats["inference_count"] and s["budget_left"] == 0
        # the same run again: everything from the cache, nothing paid, same transfer set
        bb2 = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=db, budget=40)
        xd2, t2 = query_planned(bb2, x, 8)
        assert torch.equal(xd2, xd) and torch.equal(t2, t) and bb2.stats()["queries_paid"] == 0
        # a slightly larger budget buys exactly the difference
        bb3 = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=db, budget=43)
        xd3, _ = query_planned(bb3, x, 8)
        assert xd3.shape[0] == 35 and bb3.stats()["queries_paid"] == 3
        assert app.state.stats["inference_count"] == 43
        with pytest.raises(QueryBudgetExceeded, match=r"needs a budget of at least 48"):
            bb3(x[:40])


@pytest.mark.parametrize("point", ["connect", "answered", "interrupted"])
def test_client_dies_at_several_points_then_resumes(tmp_path, point):
    """The client dies before sending, after the server answered (answer lost), or is
    interrupted with a request out; the resumed run finishes within the budget and the
    ledger accounts for every sample the server answered."""
    from fastkd.methods.mekd import query_planned
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny")
    db = tmp_path / "c.sqlite"
    x = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(4))
    with ServerThread(app) as srv:
        bb = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=db, budget=30, retries=0)
        if point == "connect":
            bb._t.port = free_port()  # nothing listens there: refused before sending
            with pytest.raises(TeacherUnavailable):
                query_planned(bb, x, 8)
        else:
            _lose_answers(bb, {2}, KeyboardInterrupt() if point == "interrupted" else None)
            with pytest.raises(KeyboardInterrupt if point == "interrupted" else TeacherUnavailable):
                query_planned(bb, x, 8)
        paid = bb.stats()["queries_paid_total"]
        assert paid == app.state.stats["inference_count"]  # whatever the server answered is paid
        bb.close()
        bb2 = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=db, budget=30)
        xd, t = query_planned(bb2, x, 8)
        s = bb2.stats()
        assert s["queries_paid_total"] == app.state.stats["inference_count"] <= 30
        assert xd.shape[0] == (24 if point == "connect" else 22)  # 8 lost answers, 6 left after them
        torch.testing.assert_close(t, ref_probs(m, xd), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("clients", [2, 4])
def test_concurrent_clients_sharing_a_cache_never_pay_twice(tmp_path, clients):
    from fastkd.methods.mekd import query_planned
    m = tiny_model()
    app = create_app(Slow(m, 0.01), input_shape=SHAPE, num_classes=10, name="tiny", batch_delay=0)
    db = tmp_path / "c.sqlite"
    x = torch.randn(96, *SHAPE, generator=torch.Generator().manual_seed(5))
    res, errs = [None] * clients, []
    with ServerThread(app) as srv:
        def run(j):
            try:
                bb = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=db, budget=80, max_batch=4)
                # identical runs, as two copies of the same command would do
                res[j] = query_planned(bb, x, 8) + (bb.stats(),)
                bb.close()
            except BaseException as e:  # noqa: BLE001
                errs.append(e)
        ths = [threading.Thread(target=run, args=(j,)) for j in range(clients)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(120)
    assert not errs, errs
    served = app.state.stats["inference_count"]
    for xd, t, s in res:
        assert xd.shape[0] == 80  # every run finished with the whole budget's transfer set
        torch.testing.assert_close(t, ref_probs(m, xd), atol=1e-6, rtol=1e-5)
    import sqlite3
    with sqlite3.connect(db) as c:
        paid = c.execute("SELECT SUM(n) FROM ledger WHERE state='paid'").fetchone()[0]
        distinct = c.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        claims = c.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    assert served == paid == distinct == 80 and claims == 0, (served, paid, distinct)
    assert sum(s["answers_shared"] + s["cache_hits"] for _, _, s in res) > 0


# ----------------------------------------------------------------------------- retry policy, no live server
class ScriptedTransport:
    """A transport that answers from a script: an HTTP status, an exception, or 200 with the
    model's answer encoded by the protocol codec."""

    model_path, identity = "/v2/models/tiny", "scripted://tiny"

    def __init__(self, model, script):
        self.model, self.script, self.posts = model, list(script), 0

    def extensions(self, timeout):
        return ["binary_tensor_data"]

    def metadata(self, timeout):
        return {"name": "tiny", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1] + SHAPE}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}

    def request(self, method, path, body, timeout, extra=None):
        from fastkd import oip
        self.posts += 1
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        if step != 200:
            return step, {"retry-after": "7"}, b'{"error": "busy"}', len(body), 20
        head, ts = oip.decode_request(body, (extra or {}).get(oip.HEADER_LENGTH))
        p = ref_probs(self.model, torch.from_numpy(ts[0][2].copy())).numpy()
        data, h = oip.encode_response({"model_name": "tiny"}, [("probabilities", "FP32", p)],
                                      binary=[oip.wants_binary(head, "probabilities")])
        return 200, {k.lower(): v for k, v in h.items()}, data, len(body), len(data)


def test_retry_policy_with_a_fake_clock_and_no_server():
    from fastkd.blackbox import RetryPolicy
    from fastkd.blackbox.errors import _Attempt
    m = tiny_model()
    waits = []
    policy = RetryPolicy(retries=3, backoff=0.5, backoff_max=10.0, sleep=waits.append, random=lambda: 1.0)
    bb = BlackBoxTeacher(url="http://scripted:1/v2/models/tiny", cache=False, budget=100, retry_policy=policy)
    lost = _Attempt("timeout", "no answer (scripted)", billed=True)
    bb._t = ScriptedTransport(m, [503, lost, 429, 200])
    x = torch.randn(4, *SHAPE)
    t0 = time.monotonic()
    torch.testing.assert_close(bb(x), ref_probs(m, x), atol=1e-6, rtol=1e-5)
    assert time.monotonic() - t0 < 1.0  # nothing really waited
    # 503 and 429 carry Retry-After: 7 s; the timeout backs off 0.5 * 2**1
    assert waits == [7.0, 1.0, 7.0]
    s = bb.stats()
    assert s["retries"] == 3 and s["queries_paid_total"] == 8  # the answer + the lost (timed-out) attempt
    assert RetryPolicy(backoff=1, backoff_max=5, random=lambda: 0.0).delay(10) == 2.5
    assert RetryPolicy(backoff=1, backoff_max=5, random=lambda: 0.0).delay(0, retry_after=60) == 5
    # out of retries: a clear error, the unanswered attempts unpaid
    bb2 = BlackBoxTeacher(url="http://scripted:1/v2/models/tiny", cache=False,
                          retry_policy=RetryPolicy(retries=1, sleep=waits.append))
    bb2._t = ScriptedTransport(m, [500, 503])
    with pytest.raises(TeacherUnavailable, match="failed 2 attempts"):
        bb2(x)
    assert bb2.stats()["queries_paid_total"] == 0
    with pytest.raises(TypeError, match="retry_policy must be a RetryPolicy"):
        BlackBoxTeacher(url="http://scripted:1/v2/models/tiny", retry_policy=3)


def test_many_clients_opening_a_new_cache_at_once(tmp_path):
    """Switching a new cache file to WAL answers "database is locked" at once to a client
    opening it at the same moment; opening waits for it instead of failing."""
    import threading

    from fastkd.blackbox.ledger import _Store

    errors = []
    for trial in range(40):
        db = str(tmp_path / f"c{trial}.sqlite")

        def run():
            try:
                st = _Store(db, "t")
                st.claim([b"a", b"b"])
                st.close()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        ths = [threading.Thread(target=run) for _ in range(8)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
    assert not errors, errors[:3]
