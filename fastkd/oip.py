"""Open Inference Protocol (KServe v2 REST) codec, shared by the server and the client.

Tensors travel either as JSON (``"data": [...]``, flat or nested) or with the *binary
tensor data extension* of Triton/KServe: the body is a JSON header followed by the raw
little-endian, row-major bytes of each tensor whose ``parameters.binary_data_size`` is
set, in the order the tensors are listed; the HTTP header
``Inference-Header-Content-Length`` gives the length of the JSON part. A client asks for
binary outputs with ``"parameters": {"binary_data": true}`` on a requested output or
``"parameters": {"binary_data_output": true}`` on the request.

Everything here is pure Python + numpy (no torch), so it is cheap to import anywhere.
:class:`ProtocolError` carries a one-line message meant for the peer (an HTTP 400).
"""
from __future__ import annotations

import json

import numpy as np

try:  # parses JSON tensors about 10x faster than the standard library
    from orjson import loads as _loads
except ImportError:
    _loads = json.loads

__all__ = ["ProtocolError", "DTYPES", "INT_TYPES", "FLOAT_TYPES", "HEADER_LENGTH", "BINARY_EXTENSION",
           "format_floats", "json_data", "flatten", "decode_request", "encode_request",
           "decode_response", "encode_response", "wants_binary"]

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"

DTYPES = {"FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
          "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
          "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
          "UINT64": np.dtype("<u8"), "BOOL": np.dtype("?")}
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}


class ProtocolError(ValueError):
    """A message that does not follow the protocol (one line, for the peer)."""


def format_floats(a: np.ndarray) -> str:
    """JSON array text of a float array, flattened, with 9 significant digits (exact for fp32).

    Formatted in chunks, so that a thread doing it lets other threads run in between."""
    flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    if not flat.size:
        return "[]"
    if not np.isfinite(flat).all():
        raise ValueError("format_floats: NaN or Inf cannot be sent as JSON")
    parts = []
    for i in range(0, flat.size, _STEP):
        chunk = tuple(flat[i:i + _STEP].tolist())
        parts.append((_FMT if len(chunk) == _STEP else ",".join(["%.9g"] * len(chunk))) % chunk)
    return "[" + ",".join(parts) + "]"


_STEP = 16384
_FMT = ",".join(["%.9g"] * _STEP)


def json_data(a: np.ndarray, datatype: str) -> str:
    """The flat JSON ``data`` text of a tensor of ``datatype``."""
    if datatype in FLOAT_TYPES:
        if datatype == "FP64":
            flat = np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
            if not np.isfinite(flat).all():
                raise ValueError("json_data: NaN or Inf cannot be sent as JSON")
            return json.dumps(flat.tolist())
        return format_floats(a)
    if datatype == "BOOL":
        return json.dumps(np.asarray(a, dtype=bool).reshape(-1).tolist())
    return json.dumps(np.asarray(a).astype(np.int64).reshape(-1).tolist())


def flatten(data):
    """Flatten nested JSON lists (the protocol allows nested or flat tensor data)."""
    if isinstance(data, list) and data and isinstance(data[0], list):
        out = []
        stack = [iter(data)]
        while stack:
            for item in stack[-1]:
                if isinstance(item, list):
                    stack.append(iter(item))
                    break
                out.append(item)
            else:
                stack.pop()
        return out
    return data


def _header_length(value) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {value!r}")
    if n < 0:
        raise ProtocolError(f"{HEADER_LENGTH} must be >= 0, got {n}")
    return n


def _split(body: bytes, header_length) -> tuple[dict, memoryview]:
    n = _header_length(header_length)
    if n is None:
        n = len(body)
    if n > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has only {len(body)} bytes")
    try:
        head = _loads(bytes(body[:n]) if n < len(body) else body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the JSON part of the body is not valid JSON ({e})") from None
    if not isinstance(head, dict):
        raise ProtocolError(f"the body must be a JSON object, got {type(head).__name__}")
    return head, memoryview(body)[n:]


def _shape(spec: dict, what: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ProtocolError(f"{what}: 'shape' must be a list of integers, got {json.dumps(shape)}")
    if any(s < 0 for s in shape):
        raise ProtocolError(f"{what}: 'shape' must not hold negative sizes, got {json.dumps(shape)}")
    return shape


def _tensors(specs, binary: memoryview, what: str) -> list[tuple[str, str, np.ndarray, dict]]:
    """Decode a list of tensor specs -> [(name, datatype, array, parameters)]."""
    if not isinstance(specs, list):
        raise ProtocolError(f"'{what}' must be a list of tensors, got {type(specs).__name__}")
    out, off = [], 0
    for i, t in enumerate(specs):
        if not isinstance(t, dict):
            raise ProtocolError(f"{what}[{i}] must be an object, got {type(t).__name__}")
        name = t.get("name")
        if not isinstance(name, str):
            raise ProtocolError(f"{what}[{i}]: 'name' must be a string, got {name!r}")
        label = f"{what[:-1]} {name!r}"
        dt = t.get("datatype")
        if dt not in DTYPES:
            raise ProtocolError(f"{label}: unsupported datatype {dt!r} (one of {', '.join(DTYPES)})")
        shape = _shape(t, label)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"{label}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        npdt = DTYPES[dt]
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"{label}: binary_data_size must be an integer >= 0, got {size!r}")
            if size != count * npdt.itemsize:
                raise ProtocolError(f"{label}: binary_data_size is {size} bytes but shape {shape} of {dt} "
                                    f"needs {count * npdt.itemsize}")
            if off + size > len(binary):
                raise ProtocolError(f"{label}: the body ends {off + size - len(binary)} bytes before its "
                                    f"binary data (is {HEADER_LENGTH} right?)")
            a = np.frombuffer(binary[off:off + size], dtype=npdt).reshape(shape)
            off += size
        else:
            if "data" not in t:
                raise ProtocolError(f"{label}: no 'data' and no binary_data_size")
            flat = flatten(t["data"])
            if not isinstance(flat, list):
                raise ProtocolError(f"{label}: 'data' must be a list")
            try:
                a = np.asarray(flat, dtype=np.float64 if dt in FLOAT_TYPES else npdt)
            except (ValueError, TypeError, OverflowError):
                raise ProtocolError(f"{label}: 'data' must be a list of numbers of type {dt}") from None
            if a.ndim != 1 or a.size != count:
                raise ProtocolError(f"{label}: {a.size if a.ndim == 1 else 'nested'} values for shape {shape}")
            a = a.astype(npdt).reshape(shape) if dt in FLOAT_TYPES else a.reshape(shape)
        t.pop("data", None)  # the values now live in ``a``
        out.append((name, dt, a, params))
    if off != len(binary):
        raise ProtocolError(f"the body holds {len(binary) - off} bytes after the last binary tensor")
    return out


def decode_request(body: bytes, header_length=None):
    """An inference request -> (head dict, [(name, datatype, array, parameters)])."""
    head, binary = _split(body, header_length)
    if "inputs" not in head:
        raise ProtocolError("the request has no 'inputs'")
    outs = head.get("outputs")
    if outs is not None and (not isinstance(outs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs)):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    if head.get("parameters") is not None and not isinstance(head["parameters"], dict):
        raise ProtocolError("'parameters' must be an object")
    return head, _tensors(head["inputs"], binary, "inputs")


def wants_binary(head: dict, output_name: str) -> bool:
    """Whether the request asks for ``output_name`` as binary data."""
    for o in head.get("outputs") or []:
        if o.get("name") == output_name:
            p = o.get("parameters") or {}
            if isinstance(p, dict) and "binary_data" in p:
                return bool(p["binary_data"])
    return bool((head.get("parameters") or {}).get("binary_data_output", False))


def _encode(head: dict, key: str, tensors, binary: bool) -> tuple[bytes, dict]:
    parts, specs, blobs = [], [], []
    for name, dt, a in tensors:
        a = np.asarray(a)
        spec = '{"name":%s,"datatype":"%s","shape":%s' % (json.dumps(name), dt, json.dumps([int(s) for s in a.shape]))
        if binary:
            raw = np.ascontiguousarray(a, dtype=DTYPES[dt]).tobytes()
            blobs.append(raw)
            specs.append(spec + ',"parameters":{"binary_data_size":%d}}' % len(raw))
        else:
            specs.append(spec + ',"data":%s}' % json_data(a, dt))
    rest = json.dumps(head)[1:-1]
    parts.append("{" + rest + ("," if rest else "") + '"%s":[' % key + ",".join(specs) + "]")
    return parts, blobs


def encode_request(inputs, *, outputs=(), binary: bool = False, binary_output: bool = False,
                   request_id: str | None = None) -> tuple[bytes, dict]:
    """``inputs`` = [(name, datatype, array)] -> (body, extra HTTP headers)."""
    head = {"id": request_id} if request_id is not None else {}
    if binary_output:
        head["parameters"] = {"binary_data_output": True}
    parts, blobs = _encode(head, "inputs", inputs, binary)
    outs = [{"name": n, **({"parameters": {"binary_data": True}} if binary_output else {})} for n in outputs]
    text = (parts[0] + (',"outputs":' + json.dumps(outs) if outs else "") + "}").encode()
    if not binary and not binary_output:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


def encode_response(head: dict, outputs, *, binary) -> tuple[bytes, dict]:
    """``outputs`` = [(name, datatype, array)]; ``binary``: one flag per output -> (body, headers)."""
    specs, blobs = [], []
    for (name, dt, a), b in zip(outputs, binary):
        p, bl = _encode({}, "x", [(name, dt, a)], b)
        specs.append(p[0][len('{"x":['):-1])
        blobs.extend(bl)
    rest = json.dumps(head)[1:-1]
    text = ("{" + rest + ("," if rest else "") + '"outputs":[' + ",".join(specs) + "]}").encode()
    if not blobs:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


def decode_response(body: bytes, header_length=None) -> tuple[dict, list]:
    """An inference response -> (head dict, [(name, datatype, array, parameters)])."""
    head, binary = _split(body, header_length)
    if "outputs" not in head:
        raise ProtocolError("the response has no 'outputs'")
    return head, _tensors(head["outputs"], binary, "outputs")
