"""ResNetV2 pre-activation blocks (He et al., "Identity Mappings in Deep Residual Networks", arXiv 1603.05027).

A pre-activation block normalises and activates *before* each convolution, so the identity path is untouched:

    y = x + F(x),      F(x) = conv(act(norm(conv(act(norm(x))))))

A block that changes the resolution or the width projects the pre-activated input on its shortcut instead:

    h = act(norm(x)),  y = P(h) + conv(act(norm(conv_s(h)))),  P = 1x1 conv (stride s) or upsample + 1x1 conv.

GroupNorm instead of BatchNorm: no running statistics, so DDP workers hold identical weights and buffers and a
batch's statistics never depend on the rank it landed on.
"""

from __future__ import annotations

from torch import Tensor, nn


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class PreActBlock(nn.Module):
    """y = shortcut(x) + F(x) with pre-activation; `resample` = "down" (stride-2 conv), "up" (x2 nearest) or None.

    With resample None and in_channels == out_channels it is an identity block: the shortcut is x itself.
    """

    def __init__(self, in_channels: int, out_channels: int, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.pre = nn.Sequential(norm(in_channels), nn.SiLU())
        stride = 2 if resample == "down" else 1
        self.up = nn.Upsample(scale_factor=2, mode="nearest") if resample == "up" else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.identity = resample is None and in_channels == out_channels
        self.project = None if self.identity else nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        shortcut = x if self.identity else self.project(self.up(h))
        return shortcut + self.conv2(self.conv1(self.up(h)))


def encoder(in_channels: int, width: int, levels: int, blocks: int, out_channels: int) -> nn.Sequential:
    """(B, C, H, W) → (B, out_channels, H/2^levels, W/2^levels): a stem conv, then per level `blocks` identity
    blocks and one strided block that halves the size and doubles the width, then a pre-activated 1x1 head."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
    channels = width
    for _ in range(levels):
        layers += [PreActBlock(channels, channels) for _ in range(blocks)]
        layers.append(PreActBlock(channels, 2 * channels, resample="down"))
        channels *= 2
    layers += [PreActBlock(channels, channels) for _ in range(blocks)]
    layers += [norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 1)]
    return nn.Sequential(*layers)


def decoder(in_channels: int, width: int, levels: int, blocks: int, out_channels: int) -> nn.Sequential:
    """The mirror of `encoder`: (B, in_channels, h, w) → (B, out_channels, h·2^levels, w·2^levels), no final
    activation (the likelihood picks one). Its last module is the last layer the adaptive GAN weight looks at."""
    channels = width * 2**levels
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
    for _ in range(levels):
        layers += [PreActBlock(channels, channels) for _ in range(blocks)]
        layers.append(PreActBlock(channels, channels // 2, resample="up"))
        channels //= 2
    layers += [PreActBlock(channels, channels) for _ in range(blocks)]
    layers += [norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)]
    return nn.Sequential(*layers)
