"""Serve a torch classifier with the Open Inference Protocol (KServe v2 REST).

An ASGI application (Starlette) run by uvicorn; ``fastkd serve-teacher`` is the command
line front end. Endpoints:

* ``GET  /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata, whose
  ``extensions`` list ``binary_tensor_data``);
* ``GET  /v2/models/{name}`` (model metadata), ``GET /v2/models/{name}/ready``;
* ``POST /v2/models/{name}/infer`` (also under ``/versions/{v}``): one float input tensor
  (FP32, or FP16/FP64) of shape ``[N, *input_shape]``, as JSON data (flat or nested) or as
  binary tensor data (``Inference-Header-Content-Length``); answers ``response="soft"``
  with the softmax probabilities (``FP32 [N, C]``, output ``probabilities``) or
  ``response="hard"`` with the top-1 label only (``INT64 [N, 1]``, output ``label``; the
  number of classes is given in the metadata's ``parameters``), as JSON or binary as the
  request asks (``binary_data`` on a requested output or ``binary_data_output``);
* ``GET  /v2/models/{name}/stats``: samples answered, requests and model executions.

Dynamic batching: concurrent requests are queued and coalesced into one model call of at
most ``max_batch`` samples. Requests that arrive while the model runs join the next call;
when a call could start but other requests are still being received or parsed, the
batcher waits for them at most ``batch_delay`` seconds (a lone client never waits). The model runs in one thread under ``torch.inference_mode()`` on
``device``.

Limits and errors: a body larger than ``max_body`` bytes is refused with 413, from its
``Content-Length`` before anything is read, or as soon as the streamed bytes pass the
limit. Bodies of ``offload_bytes`` or more are parsed off the event loop (JSON in a worker
process, so that even the GIL stays free; binary in a thread), so health checks and other
clients are never blocked by one large request. Malformed requests get HTTP 400 with a
JSON ``{"error": "..."}`` line, unknown models 404, missing or wrong tokens 401.

Access control: with ``token`` set every endpoint but ``/v2/health/*`` needs
``Authorization: Bearer <token>``. ``access_log`` (a path or ``"-"`` for stderr) writes one
line per request: client, method, path, status, bytes in/out and milliseconds.
"""
from __future__ import annotations

import asyncio
import hmac
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import oip

__all__ = ["create_app", "serve", "free_port", "ServerThread", "DEFAULT_MAX_BODY"]

DEFAULT_MAX_BODY = 64 * 2 ** 20
DEFAULT_OFFLOAD = 1 * 2 ** 20


def _err(msg: str, status: int = 400, headers: dict | None = None):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": msg}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class _Parser:
    """Parse large bodies off the event loop: JSON in a forked worker process (the JSON
    decoder holds the GIL), binary in a thread. Falls back to a thread without ``fork``."""

    def __init__(self) -> None:
        self.pool = None
        self.lock = threading.Lock()

    def _pool(self):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with self.lock:
            if self.pool is None and "fork" in mp.get_all_start_methods():
                self.pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("fork"))
            return self.pool

    async def parse(self, body: bytes, header_length):
        loop = asyncio.get_running_loop()
        if header_length is None:  # JSON: keep the GIL-holding decoder out of this process
            pool = self._pool()
            if pool is not None:
                from concurrent.futures.process import BrokenProcessPool
                try:  # submit from a thread: the first submit forks the worker
                    fut = await loop.run_in_executor(None, pool.submit, oip.decode_request, body, None)
                    return await asyncio.wrap_future(fut)
                except BrokenProcessPool:
                    with self.lock:
                        self.pool = None
        return await loop.run_in_executor(None, oip.decode_request, body, header_length)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class _Batcher:
    """Coalesce queued requests into model calls of at most ``max_batch`` samples."""

    def __init__(self, run, max_batch: int, delay: float) -> None:
        self.run, self.max_batch, self.delay = run, max_batch, delay
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fastkd-model")
        self.queue: asyncio.Queue | None = None
        self.loop = None
        self.task = None
        self.incoming = 0  # requests being read or parsed, that may join the next call

    async def submit(self, x: torch.Tensor):
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # first request on this event loop
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._serve())
        fut = loop.create_future()
        self.queue.put_nowait((x, fut))
        return await fut

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        q = self.queue
        held = None
        while True:
            first = held or await q.get()
            held = None
            batch, n = [first], first[0].shape[0]
            deadline = loop.time() + self.delay
            while n < self.max_batch:
                try:
                    nxt = q.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0 or self.incoming == 0:  # nobody else is on the way: run now
                        break
                    try:
                        nxt = await asyncio.wait_for(q.get(), left)
                    except asyncio.TimeoutError:
                        break
                if n + nxt[0].shape[0] > self.max_batch:
                    held = nxt
                    break
                batch.append(nxt)
                n += nxt[0].shape[0]
            batch = [(x, f) for x, f in batch if not f.done()]  # drop requests whose client left
            if not batch:
                continue
            xs = batch[0][0] if len(batch) == 1 else torch.cat([x for x, _ in batch])
            try:
                out = await loop.run_in_executor(self.executor, self.run, xs, len(batch))
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            i = 0
            for x, f in batch:
                if not f.done():
                    f.set_result(out[i:i + x.shape[0]])
                i += x.shape[0]


class _AccessLog:
    """ASGI wrapper writing one line per HTTP request."""

    def __init__(self, app, target: str) -> None:
        self.app = app
        self.file = sys.stderr if target == "-" else open(target, "a", buffering=1)
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        box = {"in": 0, "out": 0, "status": 0}

        async def rx():
            msg = await receive()
            box["in"] += len(msg.get("body", b""))
            return msg

        async def tx(msg):
            if msg["type"] == "http.response.start":
                box["status"] = msg["status"]
            elif msg["type"] == "http.response.body":
                box["out"] += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, rx, tx)
        finally:
            c = scope.get("client") or ("-", 0)
            line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}Z {c[0]}:{c[1]} "
                    f"\"{scope['method']} {scope['path']}\" {box['status'] or '-'} in={box['in']} "
                    f"out={box['out']} {1000 * (time.perf_counter() - t0):.1f}ms\n")
            with self.lock:
                self.file.write(line)
                self.file.flush()


def create_app(model: torch.nn.Module, *, input_shape, num_classes: int, name: str = "teacher",
               response: str = "soft", max_batch: int = 1024, version: str = "1",
               device: str | torch.device = "cpu", batch_delay: float = 0.002,
               max_body: int = DEFAULT_MAX_BODY, offload_bytes: int = DEFAULT_OFFLOAD,
               token: str | None = None, access_log: str | None = None):
    """The ASGI application serving ``model`` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    if response not in ("soft", "hard"):
        raise ValueError(f"create_app: response must be 'soft' or 'hard', got {response!r}")
    input_shape = [int(s) for s in input_shape]
    if not input_shape or any(s < 1 for s in input_shape):
        raise ValueError(f"create_app: input_shape must be positive sizes, got {input_shape!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"create_app: max_batch must be an int >= 1, got {max_batch!r}")
    if not batch_delay >= 0:
        raise ValueError(f"create_app: batch_delay must be >= 0 seconds, got {batch_delay!r}")
    if not isinstance(max_body, int) or max_body < 1:
        raise ValueError(f"create_app: max_body must be an int >= 1 (bytes), got {max_body!r}")
    if token is not None and not token:
        raise ValueError("create_app: token must be a non-empty string or None")
    device = torch.device(device)
    model = model.to(device).eval()
    stats = {"inference_count": 0, "execution_count": 0, "request_count": 0}
    in_name = "input"
    out_name = "probabilities" if response == "soft" else "label"
    out_dt = "FP32" if response == "soft" else "INT64"
    out_meta = ({"name": out_name, "datatype": "FP32", "shape": [-1, int(num_classes)]} if response == "soft"
                else {"name": out_name, "datatype": "INT64", "shape": [-1, 1],
                      "parameters": {"num_classes": int(num_classes)}})
    meta = {"name": name, "versions": [version], "platform": "pytorch_torch",
            "inputs": [{"name": in_name, "datatype": "FP32", "shape": [-1] + input_shape}],
            "outputs": [out_meta],
            "parameters": {"num_classes": int(num_classes), "response": response, "max_batch": max_batch}}
    parser = _Parser()
    auth = None if token is None else ("Bearer " + token).encode()

    def check_model(request):
        if request.path_params["model"] != name:
            return _err(f"unknown model {request.path_params['model']!r}; this server serves {name!r}", 404)
        v = request.path_params.get("version")
        if v is not None and v != version:
            return _err(f"unknown version {v!r} of model {name!r}; available: [{version!r}]", 404)
        return None

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": True})

    async def server_meta(request):
        import fastkd
        return JSONResponse({"name": "fastkd", "version": fastkd.__version__,
                             "extensions": [oip.BINARY_EXTENSION]})

    async def model_meta(request):
        return check_model(request) or JSONResponse(meta)

    async def model_ready(request):
        return check_model(request) or JSONResponse({"name": name, "ready": True})

    async def model_stats(request):
        return check_model(request) or JSONResponse({"model_stats": [{"name": name, "version": version, **stats}]})

    def check(head, tensors):
        if len(tensors) != 1 or tensors[0][0] != in_name:
            raise oip.ProtocolError(f"expected exactly one input tensor named {in_name!r}, got "
                                    f"{[t[0] for t in tensors]}")
        _, dt, a, _ = tensors[0]
        if dt not in oip.FLOAT_TYPES:
            raise oip.ProtocolError(f"input {in_name!r} must be FP32 (or FP16/FP64), got {dt!r}")
        if a.ndim != len(input_shape) + 1 or list(a.shape[1:]) != input_shape:
            raise oip.ProtocolError(f"input {in_name!r} must have shape [N, {', '.join(map(str, input_shape))}], "
                                    f"got {list(a.shape)}")
        n = a.shape[0]
        if n < 1 or n > max_batch:
            raise oip.ProtocolError(f"batch size {n} is outside 1..{max_batch}")
        for o in head.get("outputs") or []:
            if o["name"] != out_name:
                raise oip.ProtocolError(f"unknown requested output {o['name']!r}; this model has {out_name!r}")
        x = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(x).all():
            raise oip.ProtocolError(f"input {in_name!r} holds NaN or Inf")
        rid = head.get("id")
        if rid is not None and not isinstance(rid, str):
            raise oip.ProtocolError(f"'id' must be a string, got {rid!r}")
        return rid, torch.from_numpy(x if x.flags.writeable else x.copy())

    def run(x: torch.Tensor, requests: int):
        with torch.inference_mode():
            logits = model(x.to(device, non_blocking=True))
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            logits = logits.float()
            if logits.ndim != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] != num_classes:
                raise RuntimeError(f"the model returned shape {list(logits.shape)}, expected "
                                   f"[{x.shape[0]}, {num_classes}]")
            out = torch.softmax(logits, dim=1) if response == "soft" else logits.argmax(1, keepdim=True)
            out = out.cpu().numpy()
        stats["inference_count"] += x.shape[0]
        stats["execution_count"] += 1
        stats["request_count"] += requests
        return out

    batcher = _Batcher(run, max_batch, float(batch_delay))

    async def read_body(request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > max_body:
                    raise _TooLarge(int(cl))
            except ValueError:
                raise oip.ProtocolError(f"Content-Length must be an integer, got {cl!r}")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_body:
                raise _TooLarge(len(buf))
        return bytes(buf)

    async def infer(request):
        bad = check_model(request)
        if bad is not None:
            return bad
        batcher.incoming += 1
        try:
            return await _infer(request)
        finally:
            batcher.incoming -= 1

    async def _infer(request):
        try:
            body = await read_body(request)
        except _TooLarge as e:
            return _err(f"the request body is larger than the limit of {max_body} bytes "
                        f"({e.args[0]} bytes{' announced' if request.headers.get('content-length') else ' so far'});"
                        f" send smaller batches or binary tensors", 413, headers={"Connection": "close"})
        except oip.ProtocolError as e:
            return _err(str(e), 400)
        hl = request.headers.get(oip.HEADER_LENGTH.lower())
        try:
            if len(body) >= offload_bytes:
                head, tensors = await parser.parse(body, hl)
            else:
                head, tensors = oip.decode_request(body, hl)
            rid, x = check(head, tensors)
        except oip.ProtocolError as e:
            return _err(str(e), 400)
        batcher.incoming -= 1  # queued now
        try:
            out = await batcher.submit(x)
        finally:
            batcher.incoming += 1
        rhead = {"model_name": name, "model_version": version}
        if rid is not None:
            rhead["id"] = rid
        enc = (rhead, [(out_name, out_dt, out)])
        binary = [oip.wants_binary(head, out_name)]
        if out.size * 12 >= offload_bytes and not binary[0]:  # large JSON answers are formatted in a thread
            data, headers = await asyncio.get_running_loop().run_in_executor(
                None, lambda: oip.encode_response(*enc, binary=binary))
        else:
            data, headers = oip.encode_response(*enc, binary=binary)
        return Response(data, headers=headers)

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_meta),
        Route("/v2/models/{model}", model_meta), Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/stats", model_stats),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    inner = Starlette(routes=routes)

    async def app(scope, receive, send):
        if auth is not None and scope["type"] == "http" and not scope["path"].startswith("/v2/health/"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, auth):
                r = _err("missing or wrong bearer token (send 'Authorization: Bearer <token>')", 401,
                         headers={"WWW-Authenticate": "Bearer"})
                return await r(scope, receive, send)
        return await inner(scope, receive, send)

    outer = _AccessLog(app, access_log) if access_log else app

    class _App:
        """The served application; ``.state.stats`` and ``.state.metadata`` for callers."""

        def __init__(self) -> None:
            self.state = type("State", (), {})()
            self.state.stats = stats
            self.state.metadata = meta

        async def __call__(self, scope, receive, send):
            return await outer(scope, receive, send)

        def close(self) -> None:
            parser.close()
            batcher.executor.shutdown(wait=False)

    return _App()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread (tests, ``fastkd demo``).

    ``with ServerThread(app, port=...) as srv: ... srv.url`` -- stops on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning") -> None:
        import uvicorn
        self.host, self.port = host, port or free_port(host)
        self.config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                     access_log=False, lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the teacher server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(model: torch.nn.Module, *, input_shape, num_classes: int, host: str = "127.0.0.1", port: int = 8000,
          name: str = "teacher", response: str = "soft", max_batch: int = 1024, log_level: str = "info",
          **options) -> None:
    """Serve ``model`` until interrupted (blocking); ``options`` go to :func:`create_app`."""
    import uvicorn
    app = create_app(model, input_shape=input_shape, num_classes=num_classes, name=name,
                     response=response, max_batch=max_batch, **options)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off")
    finally:
        app.close()
