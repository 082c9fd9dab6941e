"""What every command-line run shares: its output folder, its record and the final check
of the student. Used by the method modules' ``cli_distill`` / ``cli_demo``.

* :func:`claim_out_dir`: an output folder holding another run's finished results is
  refused (one line naming ``--out``) unless ``--overwrite`` is given; an unfinished run's
  folder is reused, so an interrupted run resumes where it stopped.
* :func:`run_record`: what ``summary.json`` records about the run itself (fastkd, torch and
  triton versions, the command line, the seed, the backend each fused op ran on).
* :func:`finish_student`: :func:`fastkd.distill.check_student` on the trained student,
  its warnings printed; a collapsed student raises after the run's files are written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

SUMMARY = "summary.json"
#: The command line being run (set by :func:`fastkd.cli.main`; sys.argv otherwise).
COMMAND: list | None = None


class UsageError(ValueError):
    """A command-line value that cannot work (the CLI prints it as one line, exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: <what>`` and where to look, exit status 2
    (the full usage is what ``--help`` is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def claim_out_dir(path: str, overwrite: bool = False, flag: str = "--out") -> str:
    """Make ``path`` the run's output folder. A folder whose ``summary.json`` says a run
    finished there is refused unless ``overwrite``: results are never replaced silently."""
    done = os.path.join(path, SUMMARY)
    if os.path.exists(done) and not overwrite:
        when = datetime.datetime.fromtimestamp(os.path.getmtime(done)).strftime("%Y-%m-%d %H:%M")
        raise UsageError(f"{flag} {path} holds the results of another run (its {SUMMARY} was written {when}); "
                         f"give another {flag}, or --overwrite to replace them")
    os.makedirs(path, exist_ok=True)
    return path


def run_record(seed=None, argv=None) -> dict:
    """Versions, command line, seed and the backend each fused op ran on (so far)."""
    from . import __version__
    from ._backend import backends_used

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken: record that it is absent
        triton_version = None
    return {"fastkd": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(),
            "command": " ".join(["fastkd"] + list(argv if argv is not None else
                                                  (COMMAND if COMMAND is not None else sys.argv[1:]))),
            "seed": seed, "backends": backends_used(),
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def write_summary(out_dir: str, summary: dict) -> str:
    """Write ``summary.json`` atomically (a crash leaves the old file or none, never half)."""
    path = os.path.join(out_dir, SUMMARY)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def finish_student(student, teacher, inputs: torch.Tensor, *, what: str, log=None, limit: int = 4096,
                   teacher_labels: torch.Tensor | None = None) -> dict:
    """Check the trained student against the teacher on up to ``limit`` of ``inputs``
    and print its warnings; raises :class:`fastkd.distill.StudentCollapsedError` for a
    student that predicts one class for nearly everything."""
    from .distill import check_student

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    rep = check_student(student, teacher, inputs[:limit], what=what,
                        teacher_labels=None if teacher_labels is None else teacher_labels[:limit])
    for w in rep["warnings"]:
        log(f"warning: {w}")
    return rep
