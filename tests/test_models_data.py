import pytest
import torch

from fastkd import data, models


@pytest.mark.parametrize("name", ["lenet5", "lenet5_half", "cnn", "cnn_half", "mlp", "mlp_half"])
@pytest.mark.parametrize("size", [16, 32])
def test_small_models_shapes(name, size):
    kw = {"input_size": size} if name.startswith(("mlp", "cnn")) else {}
    m = models.create(name, num_classes=7, in_channels=3, **kw)
    assert m(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_half_models_are_smaller():
    for a, b in (("lenet5", "lenet5_half"), ("cnn", "cnn_half"), ("resnet18", "resnet18_half")):
        assert models.num_parameters(models.create(b)) < models.num_parameters(models.create(a)) / 2


def test_lenet5_classic_sizes():
    m = models.create("lenet5")
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [6, 16, 120]
    half = models.create("lenet5_half")
    assert [c.out_channels for c in half.modules() if isinstance(c, torch.nn.Conv2d)] == [3, 8, 60]


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnets(name):
    m = models.create(name, num_classes=10, in_channels=3, width=0.125)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    blocks = sum(isinstance(x, models.BasicBlock) for x in m.modules())
    assert blocks == (8 if name == "resnet18" else 16)


def test_create_errors():
    with pytest.raises(ValueError, match="unknown model name 'nope'"):
        models.create("nope")
    with pytest.raises(ValueError, match="num_classes"):
        models.create("cnn", num_classes=1)
    with pytest.raises(ValueError, match="in_channels"):
        models.create("cnn", in_channels=0)
    with pytest.raises(ValueError, match="input_size"):
        models.create("mlp")


def test_digits_split_fixed_and_normalised():
    x_tr, y_tr, x_te, y_te = data.digits(16)
    assert x_tr.shape == (1258, 1, 16, 16) and x_te.shape == (539, 1, 16, 16)
    assert y_tr.dtype == torch.int64 and set(y_te.tolist()) == set(range(10))
    assert abs(x_tr.mean().item()) < 1e-4 and abs(x_tr.std().item() - 1) < 1e-4
    x2, *_ = data.digits(16)
    assert torch.equal(x_tr, x2)
    x8, y8, xt8, _ = data.digits(8)
    assert x8.shape[-1] == 8 and torch.equal(y8, y_tr)  # same split at every size
    info = data.digits_info(16)
    assert info["num_classes"] == 10 and info["input_shape"] == (1, 16, 16)


def test_digits_loaders_and_errors():
    tr, te = data.digits_loaders(batch_size=100)
    xb, yb = next(iter(tr))
    assert xb.shape == (100, 1, 16, 16) and yb.shape == (100,)
    assert sum(b[0].shape[0] for b in te) == 539
    with pytest.raises(ValueError, match="size"):
        data.digits(4)


def test_init_from_teacher_same_width_copies_the_teacher():
    torch.manual_seed(0)
    t = models.create("lenet5", num_classes=10, in_channels=1, input_size=32).eval()
    s = models.create("lenet5", num_classes=10, in_channels=1, input_size=32).eval()
    x = torch.randn(4, 1, 32, 32)
    assert not torch.equal(s(x), t(x))
    assert models.init_from_teacher(s, t) == {"layers": 5, "kept": [6, 16, 120, 84, 10]}
    assert torch.equal(s(x), t(x))


def test_init_from_teacher_keeps_the_largest_channels():
    torch.manual_seed(1)
    t = models.create("lenet5", num_classes=10, in_channels=1, input_size=32)
    s = models.create("lenet5_half", num_classes=10, in_channels=1, input_size=32)
    assert models.init_from_teacher(s, t)["kept"] == [3, 8, 60, 42, 10]
    tl = [m for m in t.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    sl = [m for m in s.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    keep = None
    for a, b in zip(sl, tl):  # the specification, written out: top-k L1 rows of the input-restricted weight
        w = b.weight if keep is None else b.weight[:, keep]
        k = a.weight.shape[0]
        idx = w.abs().flatten(1).sum(1).topk(k).indices.sort().values
        assert torch.equal(a.weight, w[idx]) and torch.equal(a.bias, b.bias[idx])
        keep = idx
    assert sl[-1].weight.shape == (10, 42)


def test_init_from_teacher_batchnorm_and_flattened_inputs():
    torch.manual_seed(2)
    t = models.create("cnn_bn", num_classes=10, in_channels=1, input_size=16).eval()
    for m in t.modules():  # non-trivial statistics to copy
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
    s = models.SmallCNN(num_classes=10, in_channels=1, input_size=16, width=0.5, batch_norm=True).eval()
    models.init_from_teacher(s, t)
    tc = [m for m in t.modules() if isinstance(m, torch.nn.Conv2d)]
    sc = [m for m in s.modules() if isinstance(m, torch.nn.Conv2d)]
    tb = [m for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    sb = [m for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    idx = tc[0].weight.abs().flatten(1).sum(1).topk(sc[0].weight.shape[0]).indices.sort().values
    assert torch.equal(sb[0].running_mean, tb[0].running_mean[idx])
    assert torch.equal(sb[0].running_var, tb[0].running_var[idx])
    assert torch.equal(sb[0].weight, tb[0].weight[idx])
    # the first Linear reads the flattened blocks of the last convolution's kept channels
    tlin = [m for m in t.modules() if isinstance(m, torch.nn.Linear)][0]
    slin = [m for m in s.modules() if isinstance(m, torch.nn.Linear)][0]
    assert len(tc) == 2
    last = tc[1].weight[:, idx]
    idx2 = last.abs().flatten(1).sum(1).topk(sc[-1].weight.shape[0]).indices.sort().values
    r = tlin.in_features // tc[-1].weight.shape[0]
    cols = (idx2[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
    w = tlin.weight[:, cols]
    rows = w.abs().sum(1).topk(slin.out_features).indices.sort().values
    assert torch.equal(slin.weight, w[rows])
    assert torch.isfinite(s(torch.randn(3, 1, 16, 16))).all()


def test_init_from_teacher_errors():
    t = models.create("lenet5", num_classes=10, in_channels=1, input_size=32)
    with pytest.raises(ValueError, match="not a plain chain"):
        models.init_from_teacher(models.create("resnet18_half", num_classes=10, in_channels=1),
                                 models.create("resnet18", num_classes=10, in_channels=1))
    with pytest.raises(ValueError, match="more than the teacher"):
        models.init_from_teacher(t, models.create("lenet5_half", num_classes=10, in_channels=1, input_size=32))
    with pytest.raises(ValueError, match="numbers of classes"):
        models.init_from_teacher(models.create("lenet5_half", num_classes=5, in_channels=1, input_size=32), t)
    with pytest.raises(ValueError, match="input channels"):
        models.init_from_teacher(models.create("lenet5_half", num_classes=10, in_channels=3, input_size=32), t)
    with pytest.raises(ValueError, match="different layer sequences"):
        models.init_from_teacher(models.create("mlp_half", num_classes=10, in_channels=1, input_size=32), t)
    with pytest.raises(TypeError):
        models.init_from_teacher("lenet5_half", t)


def test_init_from_teacher_error_leaves_the_student_untouched():
    # the layers match until the classifier's input, whose flattened size does not divide: nothing is copied
    t = models.SmallCNN(num_classes=10, in_channels=1, input_size=16, width=1.0)
    s = models.SmallCNN(num_classes=10, in_channels=1, input_size=8, width=0.5)
    before = {k: v.clone() for k, v in s.state_dict().items()}
    with pytest.raises(ValueError):
        models.init_from_teacher(s, t)
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items())
