"""``SyntheticDataset``: the output of data-free synthesis (inputs, teacher probabilities,
intended labels, and the configuration that produced them)."""
from __future__ import annotations

import json
import os

import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticDataset", "FORMAT", "load_shards", "ShardMismatchError"]

FORMAT = "fastkd.synthetic/1"
#: A synthesis out_dir: MANIFEST (configuration, key) and one shard file per finished batch.
MANIFEST = "manifest.json"
SHARD_FORMAT = "fastkd.synthetic-shard/1"


class ShardMismatchError(RuntimeError):
    """out_dir holds shards written by a run with another configuration or teacher."""


def _shard_path(out_dir: str, b: int) -> str:
    return os.path.join(out_dir, f"batch_{b:06d}.pt")


class SyntheticDataset(Dataset):
    """Synthesized samples.

    Attributes:
        inputs: (N, *input_shape) float32 tensor (CPU).
        probs: (N, K) float32 teacher probabilities ``softmax(f_T(x))`` of the final inputs.
        labels: (N,) int64 labels the samples were synthesized for (the class prior).
        meta: dict of plain values (the synthesis configuration, seed, timings).

    Indexing gives ``(input, probs, label)``; :meth:`save` / :meth:`load` round-trip
    through one ``.pt`` file (loaded with ``weights_only=True``).
    """

    def __init__(self, inputs: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                 meta: dict | None = None) -> None:
        for name, t in (("inputs", inputs), ("probs", probs), ("labels", labels)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"SyntheticDataset: {name} must be a torch.Tensor, got {type(t).__name__}")
        n = inputs.shape[0]
        if probs.dim() != 2 or probs.shape[0] != n or labels.shape != (n,):
            raise ValueError(f"SyntheticDataset: expected inputs (N, ...), probs (N, K), labels (N,) with "
                             f"the same N, got {tuple(inputs.shape)}, {tuple(probs.shape)}, {tuple(labels.shape)}")
        self.inputs = inputs.detach().float().contiguous()
        self.probs = probs.detach().float().contiguous()
        self.labels = labels.detach().long().contiguous()
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], self.probs[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]

    @property
    def input_shape(self) -> tuple:
        return tuple(self.inputs.shape[1:])

    def teacher_agreement(self) -> float:
        """Fraction of samples whose teacher argmax equals the intended label."""
        if len(self) == 0:
            return float("nan")
        return (self.probs.argmax(1) == self.labels).float().mean().item()

    def save(self, path: str) -> str:
        """Write to ``path`` (a ``.pt`` file; written to a temporary name, then renamed)."""
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"format": FORMAT, "inputs": self.inputs, "probs": self.probs,
                    "labels": self.labels, "meta": self.meta}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "SyntheticDataset":
        """Read a file written by :meth:`save`, or a synthesis ``out_dir`` (its shards)."""
        if os.path.isdir(path):
            return load_shards(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"SyntheticDataset.load: no such file {path!r}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"SyntheticDataset.load: {path!r} is not a fastkd synthetic data set "
                             f"(expected format {FORMAT!r})")
        return cls(obj["inputs"], obj["probs"], obj["labels"], obj.get("meta"))

    def __repr__(self) -> str:
        return (f"SyntheticDataset(n={len(self)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


def load_shards(out_dir: str, *, allow_incomplete: bool = False) -> SyntheticDataset:
    """Assemble the :class:`SyntheticDataset` of a synthesis ``out_dir`` (batches in order)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_shards: {out_dir!r} has no {MANIFEST}; not a synthesis out_dir")
    with open(path) as f:
        man = json.load(f)
    xs, ps, ys, missing, backoffs = [], [], [], [], []
    for b in range(man["num_batches"]):
        p = _shard_path(out_dir, b)
        if not os.path.exists(p):
            missing.append(b)
            continue
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if obj.get("key") != man["key"]:
            raise ShardMismatchError(f"load_shards: {p} belongs to another run")
        xs.append(obj["inputs"])
        ps.append(obj["probs"])
        ys.append(obj["labels"])
        if obj.get("lr") is not None and obj.get("lr_scheduled") is not None and obj["lr"] != obj["lr_scheduled"]:
            backoffs.append([b, obj["lr"]])
    if missing and not allow_incomplete:
        raise RuntimeError(f"load_shards: {out_dir!r} is incomplete: {len(missing)} of {man['num_batches']} "
                           f"batches missing (first: {missing[:5]}); rerun the synthesis to finish it")
    meta = dict(man.get("config", {}))
    meta["out_dir"] = os.path.abspath(out_dir)
    meta["backoffs"] = backoffs
    return SyntheticDataset(torch.cat(xs), torch.cat(ps), torch.cat(ys), meta)
