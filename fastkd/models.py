"""Model zoo for teachers and students.

Every constructor takes ``num_classes`` and ``in_channels`` first and returns a plain
``nn.Module`` mapping (N, in_channels, H, W) images to (N, num_classes) logits. Use the
registry to build one by name::

    from fastkd import models
    net = models.create("lenet5_half", num_classes=10, in_channels=1)
    models.names()          # every registered name

Registered names:

* ``lenet5`` / ``lenet5_half`` -- LeNet-5 (6-16-120-84 channels/units) and the half-width
  version used as its student (3-8-60-42), as in the data-free KD literature. The first
  convolution pads by 2 (28x28 MNIST-style inputs give the classic 5x5 map before the
  last convolution); any size >= 8 works (an adaptive pool feeds the last convolution).
* ``resnet18`` / ``resnet34`` (and ``*_half``) -- CIFAR-style ResNets: 3x3 stem, no
  max-pool, four stages of BasicBlocks (64-128-256-512 channels at width 1), BatchNorm.
* ``cnn`` / ``cnn_half`` -- the small CNN of the bundled digits default (two 3x3 conv
  blocks with max-pool, one hidden linear layer, no BatchNorm unless ``batch_norm=True``;
  ``input_size`` is the image side, default 8).
* ``cnn_bn`` (``cnn`` with BatchNorm), ``cnn_deep`` (five conv-BN-ReLU layers, :class:`DeepCNN`),
  ``resnet8`` (ResNet of one BasicBlock per stage, 16-32-64-128 channels): BN teachers.
* ``mlp`` / ``mlp_half`` -- a two-hidden-layer perceptron over the flattened image
  (``input_size`` must be given: the image side, or a (H, W) pair).

Any ``nn.Module`` (torchvision, timm, your own) works as a teacher anywhere in fastkd;
the zoo only supplies convenient defaults.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["init_from_teacher", "LeNet5", "ResNet", "BasicBlock", "SmallCNN", "MLP", "create", "build", "names", "register",
           "num_parameters"]


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class LeNet5(nn.Module):
    """LeNet-5: conv5-pool-conv5-pool-conv5-fc-fc with ReLU; ``width=0.5`` is LeNet-5-Half."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, f = _ch(6, width), _ch(16, width), _ch(120, width), _ch(84, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5),  # identity for 28x28 inputs; lets other sizes through
            nn.Conv2d(c2, c3, 5), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3, f), nn.ReLU(inplace=True),
                                        nn.Linear(f, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no max-pool) of BasicBlocks.

    Args:
        blocks: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-34.
        width: channel multiplier (1.0 gives 64-128-256-512).
    """

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> None:
        super().__init__()
        chans = [_ch(c, width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        layers, cin = [], chans[0]
        for i, (n, c) in enumerate(zip(blocks, chans)):
            for j in range(n):
                layers.append(BasicBlock(cin, c, stride=2 if (i > 0 and j == 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class SmallCNN(nn.Module):
    """Small CNN for small images (the digits default): [conv3-ReLU-maxpool2] x 2, fc, fc.

    Args:
        width: channel multiplier (1.0: 16-32 channels, 64 hidden units; 0.5 is the student).
        batch_norm: insert BatchNorm after each convolution (off by default).
        input_size: image side (default 8, the digits' native size); the classifier sees
            32 * width channels of (input_size // 4)^2 positions.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 batch_norm: bool = False, input_size: int = 8) -> None:
        super().__init__()
        if not isinstance(input_size, int) or input_size < 4:
            raise ValueError(f"SmallCNN: input_size must be an int >= 4, got {input_size!r}")
        c1, c2, h = _ch(16, width), _ch(32, width), _ch(64, width)

        def block(cin, cout):
            mods = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                mods.append(nn.BatchNorm2d(cout))
            return mods + [nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        side = input_size // 4
        self.input_size = input_size
        self.features = nn.Sequential(*block(in_channels, c1), *block(c1, c2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, h), nn.ReLU(inplace=True),
                                        nn.Linear(h, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] // 4 != self.input_size // 4 or x.shape[-2] // 4 != self.input_size // 4:
            raise ValueError(f"SmallCNN was built for {self.input_size}x{self.input_size} inputs "
                             f"(input_size={self.input_size}), got shape {tuple(x.shape)}; "
                             "pass input_size=<image side> to models.create")
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Perceptron over the flattened image: in -> hidden[0] -> hidden[1] -> classes (ReLU).

    Args:
        input_size: image side (int) or (H, W); required, the first layer's width depends on it.
        hidden: hidden-layer widths (default (256, 128)); ``width`` scales them.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size=None,
                 hidden=(256, 128), width: float = 1.0) -> None:
        super().__init__()
        if input_size is None:
            raise ValueError("MLP: input_size is required (the image side, e.g. 16, or (H, W)), got None")
        hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        dims = [in_channels * hw[0] * hw[1]] + [_ch(h, width) for h in hidden]
        mods: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        mods.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str, ctor: Callable[..., nn.Module]) -> None:
    """Add ``ctor(num_classes=..., in_channels=..., **kwargs) -> nn.Module`` under ``name``."""
    _REGISTRY[name] = ctor


def names() -> list[str]:
    """Every registered model name."""
    return sorted(_REGISTRY)


def create(name: str, num_classes: int = 10, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`names` (e.g. ``"lenet5_half"``, ``"resnet18"``, ``"cnn_half"``).
        num_classes: output width (logits).
        in_channels: image channels.
        **kwargs: passed to the constructor (``width``, ``batch_norm`` for ``cnn``...).
            ``input_size`` (the image side) is accepted for every model and dropped for
            those that work at any size, so callers can always pass their data's size.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"models.create: unknown model name {name!r}; expected one of {names()}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"models.create: num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"models.create: in_channels must be an int >= 1, got {in_channels!r}")
    ctor = _REGISTRY[name]
    if "input_size" in kwargs:
        import inspect

        try:
            params = inspect.signature(ctor).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins
            params = {}
        takes = "input_size" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        if not takes:
            kwargs.pop("input_size")
    return ctor(num_classes=num_classes, in_channels=in_channels, **kwargs)


def build(spec: str, num_classes: int = 10, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build a model from an architecture spec, with random weights:

    * a fastkd zoo name (:func:`names`): :func:`create`;
    * ``"torchvision:<name>"``: ``torchvision.models.get_model(name, num_classes=...)``,
      torchvision's own architecture and weight names (3 input channels);
    * ``"timm:<name>"``: ``timm.create_model(name, num_classes=..., in_chans=...)`` (needs timm);
    * ``"package.module:factory"``: your own code; ``factory`` is called with whichever of
      ``num_classes``, ``in_channels`` and ``**kwargs`` it accepts and must return an
      ``nn.Module``. The module is imported, so its code runs.
    """
    import importlib
    import inspect

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"models.build: spec must be a model name or PREFIX:NAME, got {spec!r}")
    if ":" not in spec:
        return create(spec, num_classes=num_classes, in_channels=in_channels, **kwargs)
    prefix, name = spec.split(":", 1)
    kwargs.pop("input_size", None) if prefix in ("torchvision", "timm") else None
    if prefix == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise ValueError(f"models.build: {spec!r} needs torchvision (pip install torchvision)") from None
        if in_channels != 3:
            raise ValueError(f"models.build: torchvision classifiers take 3 input channels, not {in_channels} "
                             f"({spec!r})")
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"models.build: torchvision has no classification model {name!r}; see "
                             "torchvision.models.list_models(module=torchvision.models)")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(f"models.build: {spec!r} needs timm (pip install timm)") from None
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
        except RuntimeError as e:  # timm's unknown-model error
            raise ValueError(f"models.build: {spec!r}: {e}") from None
    try:
        mod = importlib.import_module(prefix)
    except ImportError as e:
        raise ValueError(f"models.build: cannot import {prefix!r} for {spec!r} ({e}); expected a fastkd model "
                         f"name ({', '.join(names())}), torchvision:NAME, timm:NAME or package.module:factory") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"models.build: {prefix} has no callable {name!r} ({spec!r})")
    args = dict(kwargs, num_classes=num_classes, in_channels=in_channels)
    try:
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            args = {k: v for k, v in args.items() if k in params}
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        pass
    m = fn(**args)
    if not isinstance(m, nn.Module):
        raise ValueError(f"models.build: {spec} returned a {type(m).__name__}, not an nn.Module")
    return m


_CHAIN_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU,
                 nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 nn.Flatten, nn.Dropout, nn.Identity)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _chain_layers(model: nn.Module, who: str) -> list[nn.Module]:
    """The Conv2d / Linear / BatchNorm layers of a plain chain, in order; ValueError for
    anything else (a residual block, a custom container, grouped convolutions)."""
    out = []
    for name, m in model.named_modules():
        if m is model or isinstance(m, nn.Sequential):
            continue
        if not isinstance(m, _CHAIN_LEAVES):
            raise ValueError(f"init_from_teacher: the {who} is not a plain chain of layers ({name!r} is a "
                             f"{type(m).__name__}); it works for the same family at a smaller width, e.g. "
                             "lenet5 -> lenet5_half or cnn -> cnn_half")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"init_from_teacher: grouped convolution {name!r} in the {who} is not supported")
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append(m)
    return out


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict:
    """Initialise ``student`` from ``teacher`` by structured channel selection: a data-free
    start for a student of the teacher's family at a smaller width (lenet5 -> lenet5_half).

    Both models must be plain chains (containers only ``nn.Sequential``) of the same
    Conv2d / Linear / BatchNorm layers with the same kernel sizes, strides and paddings, the
    student's widths no larger than the teacher's, the same input channels and classes. Each
    student layer keeps the teacher's output units of largest L1 weight norm (in their
    order), restricted to the inputs kept by the layer before; a Linear after a flattened
    convolution keeps the flattened blocks of the kept channels; BatchNorm layers keep the
    statistics and affine parameters of their convolution's kept channels.

    Returns {"layers": number of layers copied, "kept": list of kept output counts}.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("init_from_teacher: student and teacher must be nn.Modules")
    sl, tl = _chain_layers(student, "student"), _chain_layers(teacher, "teacher")
    if len(sl) != len(tl) or any(type(a) is not type(b) for a, b in zip(sl, tl)):
        raise ValueError("init_from_teacher: student and teacher have different layer sequences "
                         f"({[type(m).__name__ for m in sl]} against {[type(m).__name__ for m in tl]})")
    for a, b in zip(sl, tl):
        if isinstance(a, nn.Conv2d) and (a.kernel_size, a.stride, a.padding, a.dilation) != (
                b.kernel_size, b.stride, b.padding, b.dilation):
            raise ValueError(f"init_from_teacher: convolution shapes differ: student {a} against teacher {b}")
        wa = a.num_features if _is_bn(a) else a.weight.shape[0]
        wb = b.num_features if _is_bn(b) else b.weight.shape[0]
        if wa > wb:
            raise ValueError(f"init_from_teacher: the student's {type(a).__name__} has {wa} outputs, more than the "
                             f"teacher's {wb}")
    s_w = [m for m in sl if not _is_bn(m)]
    t_w = [m for m in tl if not _is_bn(m)]
    if s_w[0].weight.shape[1] != t_w[0].weight.shape[1]:
        raise ValueError(f"init_from_teacher: the student takes {s_w[0].weight.shape[1]} input channels/features, "
                         f"the teacher {t_w[0].weight.shape[1]}")
    if s_w[-1].weight.shape[0] != t_w[-1].weight.shape[0]:
        raise ValueError("init_from_teacher: student and teacher have different numbers of classes")
    # choose every selection first and copy at the end: an error leaves the student untouched
    copies = []  # (student tensor, teacher values)
    keep_in = None  # indices of the previous layer's kept outputs (None: all)
    keep_prev_total = 0  # the previous layer's output count in the teacher
    kept = []
    for a, b in zip(sl, tl):
        if _is_bn(a):
            idx = keep_in if keep_in is not None else torch.arange(b.num_features)
            if a.num_features != len(idx):
                raise ValueError("init_from_teacher: a BatchNorm does not follow the layer it normalises")
            for n in ("weight", "bias", "running_mean", "running_var"):
                src, dst = getattr(b, n), getattr(a, n)
                if src is not None and dst is not None:
                    copies.append((dst, src[idx.to(src.device)]))
            continue
        w = b.weight
        if keep_in is not None:
            cin = w.shape[1]
            if cin % keep_prev_total != 0:
                raise ValueError("init_from_teacher: cannot map the teacher's inputs of a layer to the kept units "
                                 "of the layer before")
            r = cin // keep_prev_total  # flattened spatial positions per channel (1 for conv -> conv)
            cols = (keep_in[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
            w = w[:, cols.to(w.device)]
        if w.shape[1:] != a.weight.shape[1:]:
            raise ValueError(f"init_from_teacher: after selecting inputs the teacher's {type(b).__name__} weight is "
                             f"{tuple(w.shape)}, the student's {tuple(a.weight.shape)}")
        k = a.weight.shape[0]
        idx = torch.arange(w.shape[0]) if k == w.shape[0] else w.abs().flatten(1).sum(1).topk(k).indices.sort().values.cpu()
        copies.append((a.weight, w[idx.to(w.device)]))
        if a.bias is not None:
            copies.append((a.bias, b.bias[idx.to(b.bias.device)] if b.bias is not None else torch.zeros_like(a.bias)))
        keep_in, keep_prev_total = idx, w.shape[0]
        kept.append(k)
    for dst, src in copies:
        dst.copy_(src)
    return {"layers": len(sl), "kept": kept}


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _with(cls, **fixed):
    def ctor(num_classes: int = 10, in_channels: int = 1, **kw):
        args = dict(fixed)
        args.update(kw)
        return cls(num_classes=num_classes, in_channels=in_channels, **args)
    ctor.__wrapped__ = cls  # inspect.signature (used by create) reports the class's parameters
    return ctor


register("lenet5", _with(LeNet5, width=1.0))
register("lenet5_half", _with(LeNet5, width=0.5))
register("resnet18", _with(ResNet, blocks=(2, 2, 2, 2)))
register("resnet34", _with(ResNet, blocks=(3, 4, 6, 3)))
register("resnet18_half", _with(ResNet, blocks=(2, 2, 2, 2), width=0.5))
register("resnet34_half", _with(ResNet, blocks=(3, 4, 6, 3), width=0.5))
register("cnn", _with(SmallCNN, width=1.0))
register("cnn_half", _with(SmallCNN, width=0.5))
register("mlp", _with(MLP, width=1.0))
register("mlp_half", _with(MLP, width=0.5))


# --------------------------------------------------------------------------- BN teachers
class DeepCNN(nn.Module):
    """Deeper CNN with BatchNorm for small images: five conv3-BN-ReLU layers
    (32, 32 | pool | 64, 64 | pool | 64 channels at width 1), global average pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = _ch(32, width), _ch(64, width)

        def cbr(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*cbr(in_channels, c1), *cbr(c1, c1), nn.MaxPool2d(2),
                                      *cbr(c1, c2), *cbr(c2, c2), nn.MaxPool2d(2),
                                      *cbr(c2, c2), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# Teachers with BatchNorm for the TA-DFKD robustness study on the digits default.
register("cnn_bn", _with(SmallCNN, width=1.0, batch_norm=True))
register("cnn_deep", _with(DeepCNN, width=1.0))
register("resnet8", _with(ResNet, blocks=(1, 1, 1, 1), width=0.25))
