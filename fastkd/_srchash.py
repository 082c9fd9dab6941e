"""Fingerprint of the extension's sources (csrc/), compiled into fastkd._C's build tag.

Imported by setup.py straight from this file (the package itself is not importable while
it is being built) and by the test suite, which refuses to test an extension built from
other sources than the checkout's.
"""
import hashlib
import os

_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


def source_hash(csrc_dir: str) -> str:
    """sha256 (first 16 hex digits) over the relative paths and contents of csrc_dir's sources."""
    h = hashlib.sha256()
    files = []
    for root, _, names in os.walk(csrc_dir):
        files += [os.path.join(root, n) for n in names if n.endswith(_SUFFIXES)]
    for path in sorted(files, key=lambda p: os.path.relpath(p, csrc_dir).replace(os.sep, "/")):
        h.update(os.path.relpath(path, csrc_dir).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()[:16]
