"""Our own architectures: the course's MLP -> LeNet -> CNN progression plus a small ResNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imgcls.models.registry import register_model


@register_model("mlp")
def mlp(
    in_chans: int,
    num_classes: int,
    image_size: int,
    hidden: Sequence[int] = (256, 128),
    dropout: float = 0.2,
) -> nn.Module:
    """Fully connected baseline over flattened pixels."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_chans * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 style: two conv + pool blocks and three dense layers, any input size."""

    def __init__(self, in_chans: int, num_classes: int, activation: str = "relu") -> None:
        super().__init__()
        act: type[nn.Module] = nn.Tanh if activation == "tanh" else nn.ReLU
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5, padding=2),
            act(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, 5, padding=2),
            act(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(5),  # any input size -> the classic 16x5x5 feature map
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            act(),
            nn.Linear(120, 84),
            act(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(in_chans: int, num_classes: int, image_size: int, activation: str = "relu") -> nn.Module:
    """LeNet-5 (ReLU by default; `activation: tanh` for the 1998 original)."""
    return LeNet5(in_chans, num_classes, activation)


def _conv_bn(cin: int, cout: int, stride: int = 1, pool: bool = False) -> nn.Sequential:
    """3x3 conv -> BN -> ReLU; with `pool`, a 2x2 max-pool right after the conv."""
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    pooled = [nn.MaxPool2d(2, ceil_mode=True)] if pool else []
    return nn.Sequential(conv, *pooled, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _head(cin: int, num_classes: int, dropout: float, grid: int = 1) -> list[nn.Module]:
    """Average-pool to a `grid` x `grid` map (1: global), flatten, dropout, one linear layer."""
    return [
        nn.AdaptiveAvgPool2d(grid),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(cin * grid * grid, num_classes),
    ]


@register_model("simple_cnn")
def simple_cnn(
    in_chans: int,
    num_classes: int,
    image_size: int,
    widths: Sequence[int] = (32, 64, 128),
    convs_per_stage: int | Sequence[int] = 2,
    dropout: float = 0.2,
    pool_before_norm: bool = False,
    head_grid: int = 1,
) -> nn.Module:
    """VGG-style stages of 3x3 conv-BN-ReLU, max-pool between stages, average-pooled head.

    `convs_per_stage` is one number for every stage or one per stage (e.g. `[1, 2, 2]`: a
    single conv at full resolution, where convs cost the most). `pool_before_norm` pools each
    stage's last conv output before its BN and ReLU (airbench's order), so those run on a
    quarter of the pixels. `head_grid` average-pools the last stage to a `head_grid` x
    `head_grid` grid (1: global average pooling) and the linear head reads every cell, so it
    sees where a feature is, at any input size.
    """
    if head_grid < 1:
        raise TypeError(f"head_grid {head_grid} must be >= 1 (1: global average pooling)")
    if isinstance(convs_per_stage, int):
        convs_per_stage = [convs_per_stage] * len(widths)
    if len(convs_per_stage) != len(widths) or min(convs_per_stage, default=1) < 1:
        raise TypeError(
            f"convs_per_stage {list(convs_per_stage)} needs one count >= 1 per width {list(widths)}"
        )
    layers: list[nn.Module] = []
    cin = in_chans
    for i, (w, convs) in enumerate(zip(widths, convs_per_stage, strict=True)):
        if i > 0 and not pool_before_norm:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        for c in range(convs):
            last_before_pool = pool_before_norm and c == convs - 1 and i < len(widths) - 1
            layers.append(_conv_bn(cin, w, pool=last_before_pool))
            cin = w
    return nn.Sequential(*layers, *_head(cin, num_classes, dropout, head_grid))


class BasicBlock(nn.Module):
    """Pre-activation-free ResNet basic block (two 3x3 convs + identity / 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, cout, H/stride, W/stride)."""
        return self.act(self.body(x) + self.shortcut(x))


@register_model("small_resnet")
def small_resnet(
    in_chans: int,
    num_classes: int,
    image_size: int,
    widths: Sequence[int] = (32, 64, 128),
    blocks_per_stage: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """A ResNet for small images: 3x3 stem, stages of basic blocks, global average pool."""
    layers: list[nn.Module] = [_conv_bn(in_chans, widths[0])]
    cin = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks_per_stage):
            layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
            cin = w
    return nn.Sequential(*layers, *_head(cin, num_classes, dropout))
