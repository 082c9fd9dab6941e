"""fastkd.serve / fastkd serve-teacher: protocol, binary tensors, limits, errors, batching, auth, CLI.

Servers listen on 127.0.0.1 only; every loop is bounded."""
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from fastkd import oip  # noqa: E402
from fastkd.serve import ServerThread, create_app  # noqa: E402

from serving import SHAPE, Slow, ref_probs, tiny_model  # noqa: E402


def post(port, path, body, headers=None, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def get(port, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


@pytest.fixture(scope="module")
def served():
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", max_batch=64)
    with ServerThread(app) as srv:
        yield m, srv, app


def _json_req(x, **extra):
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}], **extra}).encode()


# ----------------------------------------------------------------------------- codec
@pytest.mark.parametrize("dt", ["FP32", "FP16", "FP64", "INT64"])
@pytest.mark.parametrize("binary", [False, True])
def test_codec_round_trip(dt, binary):
    rng = np.random.default_rng(0)
    a = (rng.integers(-5, 5, (3, 4)) if dt == "INT64" else rng.standard_normal((3, 4))).astype(oip.DTYPES[dt])
    body, headers = oip.encode_request([("input", dt, a)], outputs=["out"], binary=binary, binary_output=binary,
                                       request_id="r1")
    head, ts = oip.decode_request(body, headers.get(oip.HEADER_LENGTH))
    assert head["id"] == "r1" and oip.wants_binary(head, "out") == binary
    (name, got_dt, got, _), = ts
    assert name == "input" and got_dt == dt and got.dtype == oip.DTYPES[dt]
    np.testing.assert_array_equal(got, a)
    rbody, rheaders = oip.encode_response({"model_name": "m"}, [("out", dt, a)], binary=[binary])
    assert (oip.HEADER_LENGTH in rheaders) == binary
    _, outs = oip.decode_response(rbody, rheaders.get(oip.HEADER_LENGTH))
    np.testing.assert_array_equal(outs[0][2], a)
    if binary:
        assert len(rbody) - int(rheaders[oip.HEADER_LENGTH]) == a.nbytes


def test_codec_rejects_inconsistent_binary():
    a = np.zeros((2, 3), np.float32)
    body, h = oip.encode_request([("input", "FP32", a)], binary=True)
    n = int(h[oip.HEADER_LENGTH])
    with pytest.raises(oip.ProtocolError, match="ends 4 bytes before"):
        oip.decode_request(body[:-4], n)
    with pytest.raises(oip.ProtocolError, match="4 bytes after"):
        oip.decode_request(body + b"1234", n)
    with pytest.raises(oip.ProtocolError, match="Inference-Header-Content-Length is"):
        oip.decode_request(body, len(body) + 1)
    with pytest.raises(oip.ProtocolError, match="not valid JSON"):
        oip.decode_request(body, None)


# ----------------------------------------------------------------------------- server: binary + JSON
def test_binary_request_and_response_match_model(served):
    m, srv, _ = served
    x = torch.randn(5, *SHAPE)
    for dt in ("FP32", "FP16", "FP64"):
        xs = x.numpy().astype(oip.DTYPES[dt])
        body, h = oip.encode_request([("input", dt, xs)], outputs=["probabilities"], binary=True,
                                     binary_output=True)
        status, rh, data = post(srv.port, "/v2/models/tiny/infer", body, h)
        assert status == 200, data
        _, outs = oip.decode_response(data, rh[oip.HEADER_LENGTH])
        assert outs[0][1] == "FP32" and outs[0][3]["binary_data_size"] == 5 * 10 * 4
        ref = ref_probs(m, torch.from_numpy(xs.astype(np.float32)))
        torch.testing.assert_close(torch.from_numpy(outs[0][2].copy()), ref, atol=1e-6, rtol=1e-5)
    # binary input, JSON output (no binary_data asked)
    body, h = oip.encode_request([("input", "FP32", x.numpy())], binary=True)
    status, rh, data = post(srv.port, "/v2/models/tiny/infer", body, h)
    assert status == 200 and oip.HEADER_LENGTH not in rh
    assert json.loads(data)["outputs"][0]["data"][:3] == pytest.approx(ref_probs(m, x)[0, :3].tolist(), rel=1e-6)
    status, meta = get(srv.port, "/v2")
    assert "binary_tensor_data" in json.loads(meta)["extensions"]


def test_hard_labels_binary_int64():
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", response="hard")
    with ServerThread(app) as srv:
        x = torch.randn(7, *SHAPE)
        body, h = oip.encode_request([("input", "FP32", x.numpy())], binary=True, binary_output=True)
        status, rh, data = post(srv.port, "/v2/models/tiny/infer", body, h)
        assert status == 200
        _, outs = oip.decode_response(data, rh[oip.HEADER_LENGTH])
        assert outs[0][1] == "INT64" and outs[0][2].shape == (7, 1)
        assert torch.equal(torch.from_numpy(outs[0][2][:, 0].copy()), ref_probs(m, x).argmax(1))


TRITON_DEFAULTS = r"""
import sys, numpy as np
import tritonclient.http as httpclient
c = httpclient.InferenceServerClient(url=sys.argv[1])
x = np.load(sys.argv[2])
inp = httpclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)                      # binary_data=True by default
out = httpclient.InferRequestedOutput(sys.argv[4])  # binary_data=True by default
res = c.infer("tiny", [inp], outputs=[out])
assert res.get_output(sys.argv[4])["parameters"]["binary_data_size"] > 0
np.save(sys.argv[3], res.as_numpy(sys.argv[4]))
res2 = c.infer("tiny", [inp])                   # no outputs requested
np.save(sys.argv[3] + ".all.npy", res2.as_numpy(sys.argv[4]))
"""


@pytest.mark.parametrize("response", ["soft", "hard"])
def test_tritonclient_with_default_binary_settings(response, tmp_path):
    pytest.importorskip("tritonclient.http")
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", response=response)
    x = torch.randn(6, *SHAPE)
    np.save(tmp_path / "x.npy", x.numpy())
    out_name = "probabilities" if response == "soft" else "label"
    with ServerThread(app) as srv:
        r = subprocess.run([sys.executable, "-c", TRITON_DEFAULTS, f"127.0.0.1:{srv.port}", str(tmp_path / "x.npy"),
                            str(tmp_path / "y.npy"), out_name], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for f in ("y.npy", "y.npy.all.npy"):
        y = torch.from_numpy(np.load(tmp_path / f))
        if response == "soft":
            assert y.dtype == torch.float32
            torch.testing.assert_close(y, ref_probs(m, x), atol=1e-6, rtol=1e-5)
        else:
            assert y.dtype == torch.int64 and torch.equal(y[:, 0], ref_probs(m, x).argmax(1))


# ----------------------------------------------------------------------------- malformed requests
@pytest.mark.parametrize("body,match", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "no 'inputs'"),
    (json.dumps({"inputs": {"name": "input"}}).encode(), "must be a list"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, None, 4, 4],
                             "data": [0] * 16}]}).encode(), r"list of integers, got \[1, null, 4, 4\]"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, "4"],
                             "data": [0] * 16}]}).encode(), "list of integers"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4],
                             "data": [0] * 16}]}).encode(), "negative"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                             "data": ["a"] * 16}]}).encode(), "list of numbers"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                             "data": [0] * 15}]}).encode(), "15 values"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                             "data": {"values": [0] * 16}}]}).encode(), "'data' must be a list"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                             "data": [None] * 16}]}).encode(), "NaN"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 1, 4, 4],
                             "data": [0] * 16}]}).encode(), "unsupported datatype"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 1, 4, 4],
                             "data": [0] * 16}]}).encode(), "must be FP32"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 4, 4],
                             "data": [0] * 16}]}).encode(), "exactly one input tensor named 'input'"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2, 4, 4],
                             "data": [0] * 32}]}).encode(), r"must have shape \[N, 1, 4, 4\]"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 1, 4, 4],
                             "data": []}]}).encode(), "outside 1..64"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [65, 1, 4, 4],
                             "data": [0] * (65 * 16)}]}).encode(), "outside 1..64"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0] * 16}],
                 "outputs": [{"name": "logits"}]}).encode(), "unknown requested output 'logits'"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0] * 16}],
                 "outputs": [7]}).encode(), "'outputs' must be a list of objects"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                             "parameters": {"binary_data_size": "64"}}]}).encode(), "binary_data_size must be"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4],
                             "parameters": {"binary_data_size": 64}}]}).encode(), "ends 64 bytes before"),
])
def test_malformed_requests_get_400_with_a_message(served, body, match):
    import re
    _, srv, _ = served
    status, _, data = post(srv.port, "/v2/models/tiny/infer", body)
    assert status == 400, (status, data)
    msg = json.loads(data)["error"]
    assert re.search(match, msg), msg
    assert "\n" not in msg and "Traceback" not in msg


def test_bad_header_length_and_unknown_model(served):
    _, srv, _ = served
    status, _, data = post(srv.port, "/v2/models/tiny/infer", b"{}", {oip.HEADER_LENGTH: "abc"})
    assert status == 400 and "must be an integer" in json.loads(data)["error"]
    status, _, data = post(srv.port, "/v2/models/nope/infer", b"{}")
    assert status == 404 and "unknown model 'nope'" in json.loads(data)["error"]


# ----------------------------------------------------------------------------- limits
def _health_poller(port, stop, lat):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        t = time.perf_counter()
        c.request("GET", "/v2/health/ready")
        r = c.getresponse()
        r.read()
        assert r.status == 200
        lat.append(time.perf_counter() - t)
        time.sleep(0.005)
    c.close()


def _read_all(s) -> str:
    """Everything the server sends until it closes the connection."""
    s.settimeout(10)
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except OSError:
        pass
    s.close()
    return out.decode("latin-1")


def test_body_limit_announced_and_streamed():
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", max_body=2 ** 20)
    with ServerThread(app) as srv:
        # announced too large: refused before the body is sent
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 209715200\r\n\r\n")
        head = _read_all(s)
        assert head.startswith("HTTP/1.1 413") and "larger than the limit of 1048576 bytes" in head
        # chunked (no Content-Length): refused as soon as the bytes read pass the limit
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
        sent = 0
        try:
            for _ in range(200):  # up to 13 MB, far beyond the limit
                s.sendall(chunk)
                sent += 65536
        except OSError:
            pass
        head = _read_all(s)
        assert head.startswith("HTTP/1.1 413") and "so far" in head, head[:200]
        status, _ = get(srv.port, "/v2/health/ready")
        assert status == 200
        # a body just under the limit is served
        x = torch.randn(64, *SHAPE)
        status, _, _ = post(srv.port, "/v2/models/tiny/infer", _json_req(x))
        assert status == 200


def test_large_json_request_does_not_block_health_checks():
    """A large JSON body is parsed off the event loop: health checks keep answering fast
    while it is in flight (on the loop, parsing it would stall them for the whole parse).
    The first large JSON body also forks the parsing process, the largest stall here."""
    m = tiny_model()
    n = 80000  # 80000 * 16 floats: about 26 MB of JSON
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", max_batch=n, max_body=64 * 2 ** 20)
    x = torch.randn(n, *SHAPE)
    body = _json_req(x)
    t = time.perf_counter()
    oip.decode_request(body)
    t_parse = time.perf_counter() - t
    with ServerThread(app) as srv:
        get(srv.port, "/v2/health/ready")
        stop, lat = threading.Event(), []
        th = threading.Thread(target=_health_poller, args=(srv.port, stop, lat))
        th.start()
        try:
            time.sleep(0.05)
            t = time.perf_counter()
            status, _, data = post(srv.port, "/v2/models/tiny/infer", body)
            t_req = time.perf_counter() - t
        finally:
            stop.set()
            th.join(30)
    assert status == 200, data
    assert len(lat) >= 5
    worst = max(lat)
    print(f"JSON body {len(body) / 1e6:.1f} MB: parse {t_parse:.3f} s, request {t_req:.3f} s, "
          f"worst health check {1000 * worst:.1f} ms over {len(lat)} checks")
    # on the loop, the parse alone would stall a health check for t_parse
    assert worst < 0.6 * t_parse + 0.05, (worst, t_parse)


# ----------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_answers_routed_back():
    m = tiny_model()
    app = create_app(Slow(m, 0.05), input_shape=SHAPE, num_classes=10, name="tiny", max_batch=16, batch_delay=0.05)
    xs = [torch.randn(k % 3 + 1, *SHAPE) for k in range(12)]
    res = [None] * len(xs)
    with ServerThread(app) as srv:
        def one(i):
            status, _, data = post(srv.port, "/v2/models/tiny/infer", _json_req(xs[i], id=f"r{i}"))
            res[i] = (status, json.loads(data))
        ths = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
    for i, (status, j) in enumerate(res):
        assert status == 200 and j["id"] == f"r{i}"
        y = torch.tensor(j["outputs"][0]["data"]).reshape(-1, 10)
        torch.testing.assert_close(y, ref_probs(m, xs[i]), atol=1e-6, rtol=1e-5)
    st = app.state.stats
    assert st["request_count"] == 12 and st["inference_count"] == sum(x.shape[0] for x in xs)
    assert st["execution_count"] < 12  # coalesced
    # no call is larger than max_batch: 24 samples need at least 2 calls
    assert st["execution_count"] >= 2


def test_model_runs_under_inference_mode():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 10)

        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return self.lin(x.flatten(1))

    app = create_app(Probe(), input_shape=SHAPE, num_classes=10, name="tiny")
    with ServerThread(app) as srv:
        status, _, _ = post(srv.port, "/v2/models/tiny/infer", _json_req(torch.randn(2, *SHAPE)))
    assert status == 200 and seen == [True]


# ----------------------------------------------------------------------------- auth + access log
def test_bearer_token_and_access_log(tmp_path):
    m = tiny_model()
    log = tmp_path / "access.log"
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", token="s3cret", access_log=str(log))
    x = torch.randn(2, *SHAPE)
    with ServerThread(app) as srv:
        assert get(srv.port, "/v2/health/ready")[0] == 200  # probes need no token
        status, data = get(srv.port, "/v2/models/tiny")
        assert status == 401 and "bearer token" in json.loads(data)["error"]
        status, _, _ = post(srv.port, "/v2/models/tiny/infer", _json_req(x),
                            {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, _ = post(srv.port, "/v2/models/tiny/infer", _json_req(x),
                            {"Authorization": "Bearer s3cret"})
        assert status == 200
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    assert '"GET /v2/models/tiny" 401' in lines[1] and '"POST /v2/models/tiny/infer" 200' in lines[3]
    assert f"in={len(_json_req(x))}" in lines[3]


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args,match", [
    (["--port", "70000"], "--port: must be an integer in 1..65535"),
    (["--port", "x"], "--port: must be an integer"),
    (["--max-batch", "0"], "--max-batch: must be an integer in 1..inf"),
    (["--log-level", "verbose"], "--log-level: invalid choice"),
    (["--batch-delay-ms", "-1"], "--batch-delay-ms: must be a number >= 0"),
    (["--max-body-mb", "0"], "--max-body-mb: must be a number > 0"),
    (["--input-shape", "1,a"], "--input-shape: must look like 1,16,16"),
    (["--device", "tpu:x"], "--device: must be a torch device"),
    (["--access-log", "/nonexistent/dir/log"], "--access-log: the folder"),
    (["--token", ""], "--token must not be empty"),
])
def test_cli_options_validated_with_one_line_errors(args, match, capsys):
    from fastkd.cli import main
    try:
        rc = main(["serve-teacher", "digits", *args])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and match in err, err
    assert len([ln for ln in err.strip().splitlines() if not ln.startswith(("usage:", " "))]) == 1, err


def test_cli_errors_in_a_subprocess_exit_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "fastkd", "serve-teacher", "digits", "--port", "70000",
                        "--device", "cuda" if not torch.cuda.is_available() else "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--port" in r.stderr
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-m", "fastkd", "serve-teacher", "digits", "--device", "cuda"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr


def test_client_headers_reach_a_token_server_and_cli_header_is_validated(capsys):
    from fastkd.blackbox import BlackBoxTeacher, TeacherRequestError
    from fastkd.methods.mekd import cli_distill
    m = tiny_model()
    app = create_app(m, input_shape=SHAPE, num_classes=10, name="tiny", token="s3cret")
    x = torch.randn(3, *SHAPE)
    with ServerThread(app) as srv:
        with pytest.raises(TeacherRequestError, match="HTTP 401"):
            BlackBoxTeacher(url=srv.url, model_name="tiny", cache=False)(x)
        bb = BlackBoxTeacher(url=srv.url, model_name="tiny", cache=False, headers={"Authorization": "Bearer s3cret"})
        torch.testing.assert_close(bb(x), ref_probs(m, x), atol=1e-6, rtol=1e-5)
    with pytest.raises(SystemExit) as e:
        cli_distill(["--teacher-url", "http://127.0.0.1:1/v2/models/x", "--header", "no colon"])
    assert e.value.code == 2 and "--header: must look like 'Name: value'" in capsys.readouterr().err
