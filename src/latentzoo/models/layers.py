"""Small conv building blocks shared by the model families.

`levels` stride-2 convolutions (kernel 4, stride 2, padding 1) each halve height and width, so an (C, H, W) image
becomes a (2h, H/f, W/f) feature map with compression factor f = 2^levels: at the default 2 levels (f = 4)
8→2 (sklearn digits), 28→7 (MNIST), 32→8; at 3 (f = 8) a 64×64 image gives 8×8, at 4 (f = 16) 128 gives 8.
The first conv is h wide and every later one 2h. The decoder mirrors it with transposed convolutions, which
exactly double the size back.
"""

from __future__ import annotations

from torch import nn

from latentzoo.errors import ConfigError


def widths(hidden_channels: int, levels: int) -> list[int]:
    """Output channels of the `levels` stride-2 convs: h, 2h, 2h, … (a single level: 2h)."""
    return [2 * hidden_channels] if levels == 1 else [hidden_channels] + [2 * hidden_channels] * (levels - 1)


def feature_shape(
    image_shape: tuple[int, int, int], hidden_channels: int, levels: int, family: str
) -> tuple[int, int, int]:
    """(C, H, W) → (2h, H/f, W/f) with f = 2^levels, the encoder's output map; ConfigError if f does not divide
    H and W."""
    c, h, w = image_shape
    f = 2**levels
    if c < 1 or h < f or w < f or h % f or w % f:
        raise ConfigError(
            f"{family}.levels {levels} needs height and width divisible by {f}, got image shape {tuple(image_shape)}; "
            f"lower {family}.levels or resize with data.image_size"
        )
    return 2 * hidden_channels, h // f, w // f


def conv_down(in_channels: int, hidden_channels: int, levels: int = 2) -> nn.Sequential:
    """x (B, C, H, W) → features (B, 2h, H/f, W/f), f = 2^levels."""
    layers: list[nn.Module] = []
    for out_channels in widths(hidden_channels, levels):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1), nn.SiLU()]
        in_channels = out_channels
    return nn.Sequential(*layers)


def conv_up(hidden_channels: int, out_channels: int, levels: int = 2) -> nn.Sequential:
    """features (B, 2h, H/f, W/f) → logits (B, C, H, W); no final activation, the likelihood picks one."""
    channels = [*reversed(widths(hidden_channels, levels)), out_channels]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:], strict=False):
        layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.SiLU()]
    return nn.Sequential(*layers[:-1])
