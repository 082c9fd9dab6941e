"""`fastkd serve-teacher`: serve a torch classifier over the Open Inference Protocol."""
from __future__ import annotations

import argparse
import os
import sys


def load_model(spec: str, *, arch: str | None = None, num_classes: int | None = None,
               input_shape=None, in_channels: int | None = None, trust: bool = False):
    """``(model, input_shape, num_classes)`` from a MODEL argument: a bundled teacher
    (``digits``, ``fmnist``, ``fmnist-bn``) or a teacher file in any format of
    :func:`fastkd.teachers.load_teacher` (the same resolution as every method's ``--teacher``)."""
    import torch

    from fastkd.methods._cli import resolve_teacher

    if in_channels and input_shape and int(input_shape[0]) != in_channels:
        raise SystemExit(f"serve-teacher: in_channels={in_channels} but the input shape has {input_shape[0]}")
    a = argparse.Namespace(teacher=spec, teacher_model=arch, num_classes=num_classes,
                           input_shape=tuple(input_shape) if input_shape else None, trust_teacher_file=trust)
    try:
        model, _info, c, shape = resolve_teacher(a, torch.device("cpu"))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"serve-teacher: {e}")
    return model, list(shape), c


def _shape(s: str):
    try:
        out = [int(v) for v in s.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 1,16,16, got {s!r}")
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"must be positive sizes, got {s!r}")
    return out


def _int_in(lo: int, hi: int | None = None):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi if hi is not None else 'inf'}, "
                                             f"got {s!r}")
        return v
    return conv


def _float_min(lo: float, strict: bool = False):
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = float("nan")
        if not (v > lo if strict else v >= lo) or v == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} {lo:g}, got {s!r}")
        return v
    return conv


def _device(s: str) -> str:
    import torch
    try:
        d = torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:1, got {s!r}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s!r} was asked for but CUDA is not available here")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(d)


def _access_log(s: str) -> str:
    if s != "-":
        d = os.path.dirname(os.path.abspath(s))
        if not os.path.isdir(d):
            raise argparse.ArgumentTypeError(f"the folder of {s!r} does not exist")
    return s


LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def _run(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("serve-teacher needs starlette and uvicorn, dependencies of fastkd missing here: "
              "pip install starlette uvicorn", file=sys.stderr)
        return 2
    from fastkd.serve import serve

    token = args.token if args.token is not None else os.environ.get("FASTKD_SERVE_TOKEN") or None
    if args.token is not None and not args.token:
        print("serve-teacher: --token must not be empty", file=sys.stderr)
        return 2
    try:
        model, shape, c = load_model(args.model, arch=args.arch, num_classes=args.num_classes,
                                     input_shape=args.input_shape, trust=args.trust_teacher_file)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    name = args.name or (args.model if args.model in ("digits", "fmnist", "fmnist-bn") else "teacher")
    print(f"serving {args.model} as model {name!r} ({args.response} responses, input [N, "
          f"{', '.join(map(str, shape))}], {c} classes) at http://{args.host}:{args.port}/v2/models/{name} "
          f"on {args.device}; batches of up to {args.max_batch} within {args.batch_delay_ms:g} ms"
          + ("; bearer token required" if token else ""), flush=True)
    serve(model, input_shape=shape, num_classes=c, host=args.host, port=args.port, name=name,
          response=args.response, max_batch=args.max_batch, log_level=args.log_level, device=args.device,
          batch_delay=args.batch_delay_ms / 1000, max_body=int(args.max_body_mb * 2 ** 20), token=token,
          access_log=args.access_log)
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "serve-teacher", help="serve a torch classifier over the Open Inference Protocol (KServe v2 REST)",
        description="Serve MODEL at http://HOST:PORT/v2/models/NAME with the Open Inference Protocol "
                    "(the KServe v2 REST protocol of Triton, KServe and MLServer, with its binary tensor "
                    "data extension), answering with probabilities (--response soft) or the top-1 label "
                    "only (--response hard). Concurrent requests are batched into one model call. "
                    "MODEL is 'digits' (the bundled digits teacher), a TorchScript file, or a "
                    "fastkd teacher checkpoint, or a state_dict (with --arch).")
    s.add_argument("model", metavar="MODEL", help="'digits', 'fmnist', 'fmnist-bn', or a teacher file: TorchScript, "
                   "torch.export (.pt2), a fastkd checkpoint, or a state_dict with --arch")
    s.add_argument("--port", type=_int_in(1, 65535), default=8000, help="TCP port (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--response", choices=["soft", "hard"], default="soft",
                   help="soft: probabilities; hard: the top-1 label only (default: %(default)s)")
    s.add_argument("--name", help="model name in the URL (default: 'digits' for the digits teacher, else 'teacher')")
    s.add_argument("--input-shape", type=_shape,
                   help="shape of one sample, e.g. 1,16,16 (read from the checkpoint if there)")
    s.add_argument("--num-classes", type=_int_in(2), help="check the model's output width")
    s.add_argument("--arch", "--teacher-model", dest="arch", metavar="ARCH",
                   help="architecture of a bare state_dict: a fastkd model name, torchvision:NAME, timm:NAME or "
                        "package.module:factory")
    s.add_argument("--trust-teacher-file", action="store_true",
                   help="allow a model saved whole with torch.save(model): loading it runs code from the file")
    s.add_argument("--device", type=_device, default="cpu",
                   help="where the model runs: cpu, cuda, cuda:N (default: %(default)s)")
    s.add_argument("--max-batch", type=_int_in(1), default=1024,
                   help="largest accepted request and largest batched model call (default: %(default)s)")
    s.add_argument("--batch-delay-ms", type=_float_min(0), default=2.0,
                   help="how long a queued request waits for others to share its model call; requests "
                        "arriving while the model runs join the next call anyway (default: %(default)s)")
    s.add_argument("--max-body-mb", type=_float_min(0, strict=True), default=64.0,
                   help="larger request bodies are refused with HTTP 413 before they are read "
                        "(MiB, default: %(default)s)")
    s.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every endpoint but /v2/health/* "
                                   "(default: the FASTKD_SERVE_TOKEN environment variable; none if unset)")
    s.add_argument("--access-log", type=_access_log, metavar="PATH",
                   help="append one line per request (client, method, path, status, bytes in/out, ms) to "
                        "PATH, or '-' for stderr")
    s.add_argument("--log-level", choices=LOG_LEVELS, default="warning",
                   help="server log level (default: %(default)s)")
    s.set_defaults(func=_run)
