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
