"""Transports of a black-box teacher: a local callable, or the Open Inference Protocol over
HTTP/1.1 (one keep-alive connection per thread). They classify each failed attempt by
whether it may have reached the model (:class:`_Attempt`)."""
from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
import urllib.parse
from typing import Callable

import numpy as np
import torch

from .errors import TeacherRequestError, TeacherResponseError, _Attempt


class _LocalTransport:
    def __init__(self, fn: Callable, outputs: str) -> None:
        self.fn = fn
        self.outputs = outputs

    def metadata(self):
        return None

    def infer(self, x: np.ndarray, timeout: float):
        xt = torch.from_numpy(x)
        dev = None
        if isinstance(self.fn, torch.nn.Module):
            p = next(iter(self.fn.parameters()), None)
            dev = p.device if p is not None else None
        if dev is not None:
            xt = xt.to(dev)
        with torch.no_grad():
            out = self.fn(xt)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = torch.as_tensor(out).detach().float().cpu().numpy()
        return out, "FP32", 0, 0


class _HTTPTransport:
    """Open Inference Protocol (KServe v2) over HTTP/1.1, one keep-alive connection per thread."""

    KEEPALIVE_S = 2.0  # reuse a connection only while the server surely keeps it open

    def __init__(self, url: str, model_name: str | None, model_version: str | None,
                 headers: dict | None) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"BlackBoxTeacher: url must look like http://host:port[/v2/models/NAME], got {url!r}")
        path = u.path.rstrip("/")
        if "/v2/models/" in path:
            prefix, rest = path.split("/v2/models/", 1)
            parts = rest.split("/")
            model_name = model_name or parts[0]
            if len(parts) >= 3 and parts[1] == "versions":
                model_version = model_version or parts[2]
            path = prefix
        if not model_name:
            raise ValueError("BlackBoxTeacher: no model name: pass model_name= or a url ending in "
                             f"/v2/models/NAME, got url={url!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.base = path
        self.model = model_name
        self.version = model_version
        self.headers = dict(headers or {})
        self._local = threading.local()
        mp = f"{self.base}/v2/models/{urllib.parse.quote(model_name)}"
        if model_version:
            mp += f"/versions/{urllib.parse.quote(str(model_version))}"
        self.model_path = mp
        self.identity = f"{self.scheme}://{self.host}:{self.port}{mp}"

    def _conn(self, timeout: float, fresh: bool = False):
        c = getattr(self._local, "conn", None)
        last = getattr(self._local, "last", 0.0)
        if c is not None and (fresh or time.monotonic() - last > self.KEEPALIVE_S or _dropped(c)):
            c.close()
            c = None
        if c is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            c = cls(self.host, self.port, timeout=timeout)
            self._local.conn = c
        c.timeout = timeout
        if c.sock is not None:
            c.sock.settimeout(timeout)
        return c

    def _drop(self):
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
        self._local.conn = None

    def request(self, method: str, path: str, body: bytes | None, timeout: float, extra: dict | None = None):
        """One HTTP exchange -> (status, headers, body, bytes_sent, bytes_received).

        Raises _Attempt classified by whether the request may have reached the model."""
        hdrs = {"Accept": "application/json", **self.headers}
        if body is not None:
            hdrs["Content-Type"] = "application/json"
            hdrs.update(extra or {})
        c = self._conn(timeout)
        sent_head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs.items()) + f"Content-Length: {len(body or b'')}\r\n\r\n"
        sent = len(sent_head.encode()) + len(body or b"")
        try:
            if c.sock is None:
                c.connect()
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise _Attempt("connection", f"cannot connect to {self.host}:{self.port}: {e}", billed=False)
        try:
            c.request(method, path, body=body, headers=hdrs)
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            # the request may be partly delivered: its fate is unknown
            raise _Attempt("connection", f"sending to {self.host}:{self.port} failed: {e}", billed=True)
        try:
            resp = c.getresponse()
            data = resp.read()
        except socket.timeout as e:
            self._drop()
            raise _Attempt("timeout", f"no answer from {self.host}:{self.port} within {timeout:g} s ({e})",
                           billed=True)
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise _Attempt("connection", f"connection to {self.host}:{self.port} lost before the answer "
                           f"({type(e).__name__}: {e})", billed=True)
        self._local.last = time.monotonic()
        if resp.will_close:
            self._drop()
        head = sum(len(k) + len(v) + 4 for k, v in resp.getheaders()) + 17
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, sent, head + len(data)

    def extensions(self, timeout: float = 30.0) -> list:
        """The protocol extensions the server announces in ``GET /v2`` (``[]`` if it says none)."""
        status, _, data, _, _ = self.request("GET", f"{self.base}/v2", None, timeout)
        if status == 429 or status >= 500:
            raise _Attempt("server", f"GET {self.base}/v2 answered HTTP {status}: {_error_text(data)}", billed=False)
        try:
            ext = json.loads(data).get("extensions") if status == 200 else None
        except (ValueError, AttributeError):
            ext = None
        return [str(e) for e in ext] if isinstance(ext, list) else []

    def metadata(self, timeout: float = 30.0):
        status, _, data, _, _ = self.request("GET", self.model_path, None, timeout)
        if status == 429 or status >= 500:
            raise _Attempt("server", f"GET {self.identity} answered HTTP {status}: {_error_text(data)}",
                           billed=False)
        if status != 200:
            raise TeacherRequestError(f"GET {self.identity} answered HTTP {status}: {_error_text(data)}")
        try:
            meta = json.loads(data)
        except ValueError:
            raise TeacherResponseError(f"GET {self.identity}: the model metadata is not JSON: {data[:200]!r}")
        if not isinstance(meta, dict) or not isinstance(meta.get("inputs"), list):
            raise TeacherResponseError(f"GET {self.identity}: the model metadata has no 'inputs' list: {meta!r:.300}")
        return meta


def _dropped(conn) -> bool:
    """True when the server has closed a kept-alive connection (readable at EOF)."""
    if conn.sock is None:
        return False
    try:
        r, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


def _error_text(data: bytes) -> str:
    try:
        j = json.loads(data)
        if isinstance(j, dict) and "error" in j:
            return str(j["error"])
    except ValueError:
        pass
    return data[:300].decode("utf-8", "replace")
