"""Serve a torch classifier with the Open Inference Protocol (KServe v2 REST).

An ASGI application (Starlette) run by uvicorn; ``fastkd serve-teacher`` is the command
line front end. Endpoints:

* ``GET  /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata);
* ``GET  /v2/models/{name}`` (model metadata), ``GET /v2/models/{name}/ready``;
* ``POST /v2/models/{name}/infer`` (also under ``/versions/{v}``): one FP32 input tensor of
  shape ``[N, *input_shape]`` with flat or nested JSON data; answers
  ``response="soft"`` with the softmax probabilities (``FP32 [N, C]``, output ``probabilities``)
  or ``response="hard"`` with the top-1 label only (``INT64 [N, 1]``, output ``label``; the
  number of classes is given in the metadata's ``parameters``);
* ``GET  /v2/models/{name}/stats``: samples answered and requests executed.

Errors follow the protocol: a JSON ``{"error": "..."}`` with HTTP 400 (bad request) or
404 (unknown model). Requests with more than ``max_batch`` samples are rejected (400).
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

from .blackbox import format_floats

__all__ = ["create_app", "serve", "free_port", "ServerThread"]


def _err(msg: str, status: int = 400):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": msg}, status_code=status)


def create_app(model: torch.nn.Module, *, input_shape, num_classes: int, name: str = "teacher",
               response: str = "soft", max_batch: int = 1024, version: str = "1"):
    """The Starlette application serving ``model`` (called under ``torch.no_grad()``)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    if response not in ("soft", "hard"):
        raise ValueError(f"create_app: response must be 'soft' or 'hard', got {response!r}")
    input_shape = [int(s) for s in input_shape]
    if not input_shape or any(s < 1 for s in input_shape):
        raise ValueError(f"create_app: input_shape must be positive sizes, got {input_shape!r}")
    model.eval()
    lock = threading.Lock()
    stats = {"inference_count": 0, "execution_count": 0}
    in_name = "input"
    out_name = "probabilities" if response == "soft" else "label"
    out_meta = ({"name": out_name, "datatype": "FP32", "shape": [-1, int(num_classes)]} if response == "soft"
                else {"name": out_name, "datatype": "INT64", "shape": [-1, 1],
                      "parameters": {"num_classes": int(num_classes)}})
    meta = {"name": name, "versions": [version], "platform": "pytorch_torch",
            "inputs": [{"name": in_name, "datatype": "FP32", "shape": [-1] + input_shape}],
            "outputs": [out_meta],
            "parameters": {"num_classes": int(num_classes), "response": response, "max_batch": max_batch}}

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
        return JSONResponse({"name": "fastkd", "version": fastkd.__version__, "extensions": []})

    async def model_meta(request):
        return check_model(request) or JSONResponse(meta)

    async def model_ready(request):
        return check_model(request) or JSONResponse({"name": name, "ready": True})

    async def model_stats(request):
        return check_model(request) or JSONResponse({"model_stats": [{"name": name, "version": version, **stats}]})

    def parse(body: bytes):
        try:
            req = json.loads(body)
        except ValueError:
            raise ValueError("the request body is not JSON (the binary tensor extension is not supported)")
        if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
            raise ValueError(f"expected 'inputs' with exactly one tensor named {in_name!r}")
        t = req["inputs"][0]
        if not isinstance(t, dict) or t.get("name") != in_name:
            raise ValueError(f"unknown input {t.get('name') if isinstance(t, dict) else t!r}; expected {in_name!r}")
        if t.get("datatype") not in ("FP32", "FP64", "FP16"):
            raise ValueError(f"input {in_name!r} must be FP32 (or FP16/FP64), got {t.get('datatype')!r}")
        if (t.get("parameters") or {}).get("binary_data_size") is not None:
            raise ValueError("the binary tensor extension is not supported; send JSON data")
        shape = t.get("shape")
        if (not isinstance(shape, list) or len(shape) != len(input_shape) + 1
                or [int(s) for s in shape[1:]] != input_shape):
            raise ValueError(f"input {in_name!r} must have shape [N, {', '.join(map(str, input_shape))}], got {shape!r}")
        n = int(shape[0])
        if n < 1 or n > max_batch:
            raise ValueError(f"batch size {n} is outside 1..{max_batch}")
        try:
            x = np.asarray(t.get("data"), dtype=np.float32).reshape(-1)
        except (ValueError, TypeError):
            raise ValueError(f"input {in_name!r}: data must be numbers")
        if x.size != n * int(np.prod(input_shape)):
            raise ValueError(f"input {in_name!r}: {x.size} values for shape {shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"input {in_name!r} holds NaN or Inf")
        outs = req.get("outputs")
        if outs:
            names = [o.get("name") for o in outs if isinstance(o, dict)]
            if any(nm != out_name for nm in names):
                raise ValueError(f"unknown requested output in {names}; this model has {out_name!r}")
        return req.get("id"), torch.from_numpy(x.reshape([n] + input_shape))

    def run(x: torch.Tensor):
        with lock, torch.no_grad():
            logits = model(x)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            logits = logits.float()
            if logits.ndim != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] != num_classes:
                raise RuntimeError(f"the model returned shape {list(logits.shape)}, expected "
                                   f"[{x.shape[0]}, {num_classes}]")
            out = torch.softmax(logits, dim=1) if response == "soft" else logits.argmax(1, keepdim=True)
            stats["inference_count"] += x.shape[0]
            stats["execution_count"] += 1
            return out.numpy()

    async def infer(request):
        bad = check_model(request)
        if bad is not None:
            return bad
        body = await request.body()
        try:
            rid, x = parse(body)
        except ValueError as e:
            return _err(str(e), 400)
        out = await run_in_threadpool(run, x)
        if response == "soft":
            data = format_floats(out)
            shape = [out.shape[0], out.shape[1]]
            dt = "FP32"
        else:
            data = json.dumps(out.reshape(-1).astype(int).tolist())
            shape = [out.shape[0], 1]
            dt = "INT64"
        head = {"model_name": name, "model_version": version}
        if rid is not None:
            head["id"] = rid
        text = json.dumps(head)[:-1] + ', "outputs": [{"name": %s, "datatype": "%s", "shape": %s, "data": %s}]}' % (
            json.dumps(out_name), dt, json.dumps(shape), data)
        return Response(text, media_type="application/json")

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_meta),
        Route("/v2/models/{model}", model_meta), Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/stats", model_stats),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.stats = stats
    app.state.metadata = meta
    return app


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
        import time
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
          name: str = "teacher", response: str = "soft", max_batch: int = 1024, log_level: str = "info") -> None:
    """Serve ``model`` until interrupted (blocking)."""
    import uvicorn
    app = create_app(model, input_shape=input_shape, num_classes=num_classes, name=name,
                     response=response, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
