"""Bodies for the experiments: MLP, ConvNet, ResNet with projection skips.

Each builder returns ``(body, feature_dim)``: ``body`` maps images [B, C, H, W] to features [B, feature_dim] and is
built from plain ``torch.nn`` layers; ``EideticNetwork`` converts them to their Eidetic twins and traces the
layer graph (so these bodies also exercise the tracer). Per-task heads are added by the network, not here.

* ``mlp``: Flatten -> [Linear(width) -> ReLU -> Dropout] per entry of ``widths``; features = widths[-1].
  The paper's Permuted MNIST net is ``widths=[2000, 2000]``, dropout 0.1.
* ``convnet``: per entry of ``widths[:-1]`` a block Conv3x3 -> BatchNorm -> ReLU -> MaxPool2; then
  Flatten -> Linear(widths[-1]) -> ReLU -> Dropout. (Conv -> Flatten -> Linear: each channel feeds its H*W inputs.)
* ``resnet``: a CIFAR-style ResNet (3x3 stem, no stem pooling). ``widths`` = channels per stage (ResNet-18:
  [64, 128, 256, 512]), ``blocks`` = basic blocks per stage ([2, 2, 2, 2]). Every block's skip is a projection
  (1x1 conv + BN) so that each residual sum ``f(x) + g(x)`` couples just the two branches of one block (paper
  Section 3.1, "Residual connections"); stages after the first downsample by stride 2. Global average pooling;
  features = widths[-1]; dropout before the heads.
* ``resnet50``: the same CIFAR-style stem with bottleneck blocks (1x1 -> 3x3 -> 1x1 convs, 4x expansion), a
  projection on every skip; ``widths`` = bottleneck widths per stage ([64, 128, 256, 512]), ``blocks`` =
  blocks per stage (ResNet-50: [3, 4, 6, 3]); features = 4 * widths[-1]. The paper's Split CIFAR-100 net
  (Section 6.1: 3x3 first conv, no first max-pool).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["build_body", "mlp_body", "convnet_body", "resnet_body", "resnet50_body", "BasicBlock", "BottleneckBlock",
           "MODELS"]


def _widths(widths, name) -> list[int]:
    widths = [int(w) for w in (widths if isinstance(widths, (list, tuple)) else [widths])]
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"{name}: widths must be a non-empty list of positive ints, got {widths}")
    return widths


def mlp_body(input_shape: Sequence[int], widths=(400, 400), dropout: float = 0.0, **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "mlp")
    layers: list[nn.Module] = [nn.Flatten()]
    n_in = 1
    for d in input_shape:
        n_in *= int(d)
    for w in widths:
        layers += [nn.Linear(n_in, w), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        n_in = w
    return nn.Sequential(*layers), widths[-1]


def convnet_body(input_shape: Sequence[int], widths=(32, 64, 256), dropout: float = 0.0, **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "convnet")
    if len(widths) < 2:
        raise ValueError("convnet: widths needs at least one conv width and the final fully connected width, "
                         f"e.g. [32, 64, 256]; got {widths}")
    c, h, w = (int(d) for d in input_shape)
    layers: list[nn.Module] = []
    for out in widths[:-1]:
        if min(h, w) < 2:
            raise ValueError(f"convnet: {len(widths) - 1} pooling blocks shrink a {tuple(input_shape)} input to "
                             "nothing; use fewer conv widths")
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, widths[-1]), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers), widths[-1]


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + bn(conv1x1(x))): a ResNet basic block whose skip is a projection."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut_bn(self.shortcut_conv(x)))


class BottleneckBlock(nn.Module):
    """relu(bn(conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(x)))))))) + bn(conv1x1(x))): a ResNet bottleneck block
    (4x expansion) whose skip is a projection."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut_bn(self.shortcut_conv(x)))


class ResNetBody(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], blocks: list[int], dropout: float, block=BasicBlock):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, c = [], widths[0]
        expansion = getattr(block, "expansion", 1)
        for s, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                stages.append(block(c, w, stride=2 if (s > 0 and b == 0) else 1))
                c = w * expansion
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.dropout(self.flatten(self.pool(x)))


def resnet_body(input_shape: Sequence[int], widths=(64, 128, 256, 512), dropout: float = 0.0, blocks=None,
                **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "resnet")
    blocks = [2] * len(widths) if blocks is None else [int(b) for b in blocks]
    if len(blocks) != len(widths) or any(b < 1 for b in blocks):
        raise ValueError(f"resnet: blocks needs one positive count per stage width; widths={widths}, "
                         f"blocks={blocks}")
    return ResNetBody(int(input_shape[0]), widths, blocks, dropout), widths[-1]


def resnet50_body(input_shape: Sequence[int], widths=(64, 128, 256, 512), dropout: float = 0.0, blocks=None,
                  **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "resnet50")
    blocks = [3, 4, 6, 3] if blocks is None else [int(b) for b in blocks]
    if len(blocks) != len(widths) or any(b < 1 for b in blocks):
        raise ValueError(f"resnet50: blocks needs one positive count per stage width; widths={widths}, "
                         f"blocks={blocks}")
    body = ResNetBody(int(input_shape[0]), widths, blocks, dropout, block=BottleneckBlock)
    return body, widths[-1] * BottleneckBlock.expansion


MODELS = {"mlp": mlp_body, "convnet": convnet_body, "resnet": resnet_body, "resnet50": resnet50_body}


def build_body(model: str, input_shape: Sequence[int], widths=None, dropout: float = 0.0, blocks=None
               ) -> tuple[nn.Module, int]:
    """``(body, feature_dim)`` for ``model`` in ``MODELS``; ``widths=None`` takes its default."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    kwargs = {"dropout": float(dropout or 0.0)}
    if widths is not None:
        kwargs["widths"] = widths
    if blocks is not None:
        kwargs["blocks"] = blocks
    return MODELS[model](tuple(input_shape), **kwargs)
