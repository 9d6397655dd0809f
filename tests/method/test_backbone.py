"""SplitResNet: the split, stem shapes, local pretrained weights (nothing downloaded)."""

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

from tally.method.backbone import SplitResNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("cut", "shape"), [("layer1", (64, 8, 8)), ("layer2", (128, 4, 4)), ("layer3", (256, 2, 2))]
)
def test_stem_shape_and_forward(cut, shape):
    torch.manual_seed(0)
    net = SplitResNet("resnet10", cut, 3)
    bn = net.stem.bn1
    before = bn.running_mean.clone()
    assert net.stem_shape(32) == shape and net.stem_channels == shape[0]
    assert torch.equal(bn.running_mean, before)  # stem_shape leaves BatchNorm statistics alone
    assert net.training
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    z = net.stem(x)
    assert z.shape == (2, *shape)
    torch.testing.assert_close(net(x), net.head(z))
    assert net(x).shape == (2, 3)


def test_bottleneck_channels():
    net = SplitResNet("resnet50", "layer2", 5)
    assert net.stem_channels == 512 and net.head.fc.in_features == 2048


def test_local_pretrained_file_loads_and_ignores_fc(tmp_path):
    src = ResNet(BasicBlock, [1, 1, 1, 1])  # torchvision key names, 1000-way fc
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    net = SplitResNet("resnet10", "layer2", 3, pretrained=str(path))
    assert torch.equal(net.stem.conv1.weight, src.conv1.weight)
    assert torch.equal(net.head.layer4[0].conv2.weight, src.layer4[0].conv2.weight)
    assert net.head.fc.out_features == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="resnet10"):
        SplitResNet("resnet10", "layer2", 3, pretrained="imagenet")
    with pytest.raises(ValueError, match="arch"):
        SplitResNet("vgg", "layer2", 3)
    with pytest.raises(ValueError, match="cut"):
        SplitResNet("resnet18", "layer4", 3)
    with pytest.raises(FileNotFoundError):
        SplitResNet("resnet10", "layer2", 3, pretrained="/nonexistent/weights.pt")
