"""`fastkd serve-teacher`: serve a torch classifier over the Open Inference Protocol."""
from __future__ import annotations

import sys


def load_model(spec: str, *, arch: str | None = None, num_classes: int | None = None,
               input_shape=None, in_channels: int | None = None):
    """``(model, input_shape, num_classes)`` from a MODEL argument: ``digits`` (the bundled
    digits teacher) or a teacher file read by :func:`fastkd.teachers.load_teacher`
    (TorchScript, a fastkd checkpoint, or a state_dict with ``--arch``)."""
    import torch

    from fastkd.teachers import load_teacher

    try:
        model, info = load_teacher(spec, model=arch, num_classes=num_classes,
                                   in_channels=in_channels or (int(input_shape[0]) if input_shape else None))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"serve-teacher: {e}")
    input_shape = input_shape or info.get("input_shape")
    if input_shape is None:
        raise SystemExit("serve-teacher: give the input shape of one sample, e.g. --input-shape 1,16,16")
    with torch.no_grad():
        out = model(torch.zeros([1] + list(input_shape)))
    c = int(out.shape[-1])
    if num_classes is not None and c != num_classes:
        raise SystemExit(f"serve-teacher: the model answers with {c} scores, --num-classes says {num_classes}")
    return model, list(input_shape), c


def _shape(s: str):
    try:
        out = [int(v) for v in s.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"serve-teacher: --input-shape must look like 1,16,16, got {s!r}")
    if not out or any(v < 1 for v in out):
        raise SystemExit(f"serve-teacher: --input-shape must be positive sizes, got {s!r}")
    return out


def _run(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("serve-teacher needs starlette and uvicorn, dependencies of fastkd missing here: "
              "pip install starlette uvicorn", file=sys.stderr)
        return 2
    from fastkd.serve import serve

    model, shape, c = load_model(args.model, arch=args.arch, num_classes=args.num_classes,
                                 input_shape=_shape(args.input_shape) if args.input_shape else None)
    name = args.name or ("digits" if args.model == "digits" else "teacher")
    print(f"serving {args.model} as model {name!r} ({args.response} responses, input [N, "
          f"{', '.join(map(str, shape))}], {c} classes) at http://{args.host}:{args.port}/v2/models/{name}",
          flush=True)
    serve(model, input_shape=shape, num_classes=c, host=args.host, port=args.port, name=name,
          response=args.response, max_batch=args.max_batch, log_level=args.log_level)
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "serve-teacher", help="serve a torch classifier over the Open Inference Protocol (KServe v2 REST)",
        description="Serve MODEL at http://HOST:PORT/v2/models/NAME with the Open Inference Protocol "
                    "(the KServe v2 REST protocol of Triton, KServe and MLServer), answering with "
                    "probabilities (--response soft) or the top-1 label only (--response hard). "
                    "MODEL is 'digits' (the bundled digits teacher), a TorchScript file, or a "
                    "fastkd teacher checkpoint, or a state_dict (with --arch).")
    s.add_argument("model", metavar="MODEL", help="'digits', a TorchScript file or a torch.save checkpoint")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--response", choices=["soft", "hard"], default="soft",
                   help="soft: probabilities; hard: the top-1 label only (default: %(default)s)")
    s.add_argument("--name", help="model name in the URL (default: 'digits' for the digits teacher, else 'teacher')")
    s.add_argument("--input-shape", help="shape of one sample, e.g. 1,16,16 (read from the checkpoint if there)")
    s.add_argument("--num-classes", type=int, help="check the model's output width")
    s.add_argument("--arch", help="architecture of a bare state_dict (a fastkd.models name)")
    s.add_argument("--max-batch", type=int, default=1024, help="largest accepted batch (default: %(default)s)")
    s.add_argument("--log-level", default="warning", help="uvicorn log level (default: %(default)s)")
    s.set_defaults(func=_run)
