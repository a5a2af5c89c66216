"""Small conv building blocks shared by the model families.

Two stride-2 convolutions (kernel 4, stride 2, padding 1) halve height and width twice, so an (C, H, W) image
becomes a (2h, H/4, W/4) feature map: 8→4→2 (sklearn digits), 28→14→7 (MNIST), 32→16→8 (CIFAR-sized).
The decoder mirrors it with two transposed convolutions, which exactly double the size back.
"""

from __future__ import annotations

from torch import nn

from latentzoo.errors import ConfigError

DOWNSAMPLE = 4  # two stride-2 convs


def feature_shape(image_shape: tuple[int, int, int], hidden_channels: int, family: str) -> tuple[int, int, int]:
    """(C, H, W) → (2h, H/4, W/4), the encoder's output map; ConfigError if H or W is not divisible by 4."""
    c, h, w = image_shape
    if c < 1 or h < DOWNSAMPLE or w < DOWNSAMPLE or h % DOWNSAMPLE or w % DOWNSAMPLE:
        raise ConfigError(
            f"{family} needs height and width divisible by {DOWNSAMPLE}, got image shape {tuple(image_shape)}; "
            "resize with data.image_size"
        )
    return 2 * hidden_channels, h // DOWNSAMPLE, w // DOWNSAMPLE


def conv_down(in_channels: int, hidden_channels: int) -> nn.Sequential:
    """x (B, C, H, W) → features (B, 2h, H/4, W/4)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size=4, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(hidden_channels, 2 * hidden_channels, kernel_size=4, stride=2, padding=1),
        nn.SiLU(),
    )


def conv_up(hidden_channels: int, out_channels: int) -> nn.Sequential:
    """features (B, 2h, H/4, W/4) → logits (B, C, H, W); no final activation, the likelihood picks one."""
    return nn.Sequential(
        nn.ConvTranspose2d(2 * hidden_channels, hidden_channels, kernel_size=4, stride=2, padding=1),
        nn.SiLU(),
        nn.ConvTranspose2d(hidden_channels, out_channels, kernel_size=4, stride=2, padding=1),
    )
