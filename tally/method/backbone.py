"""A torchvision ResNet cut into a `stem` (conv1 .. cut stage) and a `head` (the rest + classifier).

TALLY disentangles the stem's feature map into semantics and style, so the split point is a
hyperparameter (`cut`); everything else is a stock torchvision ResNet so ImageNet weights load as is.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),  # tiny, for CPU tests and demos; no pretrained weights exist
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
CUTS = ("layer1", "layer2", "layer3")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


IMAGENET_WEIGHTS = ("default", "v1")


def imagenet_weights(arch: str, version: str = "default"):
    """torchvision's weights enum entry: "default" (DEFAULT: IMAGENET1K_V2 for ResNet-50) or "v1"
    (IMAGENET1K_V1, what the reference's `resnet50(pretrained=True)` loads, tally.py:62)."""
    if version not in IMAGENET_WEIGHTS:
        raise ValueError(f"unknown ImageNet weights {version!r}; expected one of {IMAGENET_WEIGHTS}")
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch)
    return weights.DEFAULT if version == "default" else weights.IMAGENET1K_V1


def _imagenet_state_dict(arch: str, version: str = "default") -> dict[str, torch.Tensor]:
    """ImageNet weights via torchvision's weights API (downloads once into the torch hub cache)."""
    if arch == "resnet10":
        raise ValueError(
            "pretrained='imagenet' is not available for resnet10 (torchvision has no such weights)"
        )
    return imagenet_weights(arch, version).get_state_dict(progress=False)


def _file_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local state dict (torchvision ResNet key names, optionally prefixed by `module.`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


class SplitResNet(nn.Module):
    """ResNet with `.stem` (conv1 .. `cut`) and `.head` (later stages, avg pool, flatten, new `fc`).

    `pretrained`: None (random init), "imagenet" (torchvision weights; never used in tests) or a path
    to a local state dict with torchvision key names; its `fc` is ignored (the classifier is new).
    `weights`: which ImageNet weights "imagenet" loads (`imagenet_weights`).
    """

    def __init__(self, arch: str, cut: str, num_classes: int, pretrained: str | Path | None = None,
                 weights: str = "default"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
        if cut not in CUTS:
            raise ValueError(f"unknown cut {cut!r}; expected one of {list(CUTS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch, self.cut, self.num_classes = arch, cut, num_classes
        block, layers = ARCHS[arch]
        net = ResNet(block, layers)
        if pretrained is not None:
            sd = _imagenet_state_dict(arch, weights) if pretrained == "imagenet" else _file_state_dict(pretrained)
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"pretrained weights do not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        k = _STAGES.index(cut) + 1
        stem = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
        stem += [(s, getattr(net, s)) for s in _STAGES[:k]]
        head = [(s, getattr(net, s)) for s in _STAGES[k:]]
        head += [("avgpool", net.avgpool), ("flatten", nn.Flatten(1))]
        head += [("fc", nn.Linear(net.fc.in_features, num_classes))]
        self.stem = nn.Sequential(OrderedDict(stem))
        self.head = nn.Sequential(OrderedDict(head))
        self.stem_channels: int = 64 * block.expansion * 2 ** (k - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))

    @torch.no_grad()
    def stem_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the stem output for square (or (H, W)) inputs: sizes the prototype memory.

        Runs one zero image in eval mode so BatchNorm running statistics are not touched.
        """
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        p = next(self.stem.parameters())
        was_training = self.stem.training
        self.stem.eval()
        try:
            out = self.stem(torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype))
        finally:
            self.stem.train(was_training)
        return tuple(out.shape[1:])
