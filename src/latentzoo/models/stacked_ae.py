"""Stacked (denoising) autoencoder: greedy layer-wise pretraining, then supervised fine-tuning.

Bengio et al., "Greedy Layer-Wise Training of Deep Networks" (NIPS 2006); Vincent et al., "Stacked Denoising
Autoencoders" (JMLR 2010). With d_0 = C·H·W and layer sizes d_1..d_L, layer k is one autoencoder

    h_k = f(W_k h̃_{k-1} + b_k),    ĥ_{k-1} = g_k(W'_k h_k + b'_k),    h_0 = x flattened,

where h̃ is h with a fraction ν of its entries set to 0 (masking noise; ν = `corruption`, 0 for a plain AE),
f the activation, g_1 a sigmoid (pixels lie in [0, 1]) and g_k the identity above. The model trains in phases:

    pretrain k:  minimise mean (ĥ_{k-1} - h_{k-1})² over W_k, W'_k; layers 1..k-1 frozen (their outputs are the data)
    finetune:    minimise cross-entropy of softmax(V h_L(x̃)) over W_1..W_L and the head V (decoders frozen), with
                 dropout on every h_k and x̃ = x moved by a random whole-pixel offset in [−s, s]² (`max_shift`),
                 then with a fraction of its pixels masked to 0 (`input_corruption`)
    probe:       the same loss over the head V alone (a linear probe of the frozen features h_L)

`set_phase` selects one; only that phase's parameters keep requires_grad, so the optimiser and DDP see exactly
the parameters the phase trains.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from latentzoo.models.base import LatentModel, ModelOutput
from latentzoo.schema import Section

Mode = Literal["pretrain", "finetune", "probe"]
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


class StackedAEConfig(Section):
    """params.yaml section `stacked_ae`: the stack and its greedy pretraining (pretrain stage)."""

    own_stages: ClassVar[bool] = True  # trained by the pretrain and finetune stages, not by `models`

    layers: list[int] = Field(default_factory=lambda: [500, 500, 2000], min_length=1)  # d_1..d_L
    activation: Literal["relu", "sigmoid", "silu"] = "relu"
    corruption: float = Field(0.2, ge=0, lt=1)  # ν: fraction of each layer's inputs masked to 0 (denoising)
    num_classes: int = Field(10, ge=2)  # the classifier head; must match the data's classes
    pretrain_epochs: int = Field(10, ge=1)  # per layer
    pretrain_lr: float = Field(1e-3, gt=0)

    @field_validator("layers")
    @classmethod
    def _positive_sizes(cls, layers: list[int]) -> list[int]:
        bad = [size for size in layers if size < 1]
        if bad:
            raise ValueError(f"every layer size must be >= 1, got {layers}")
        return layers


class StackedAutoencoder(LatentModel):
    """Encoders W_1..W_L with decoders W'_1..W'_L and a classifier head V on h_L; see the module docstring."""

    def __init__(self, cfg: StackedAEConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        dims = [math.prod(self.image_shape), *cfg.layers]
        self.dims = dims
        act = ACTIVATIONS[cfg.activation]
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(a, b), act()) for a, b in zip(dims, dims[1:]))
        self.decoders = nn.ModuleList(nn.Linear(b, a) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], cfg.num_classes)
        self.dropout = nn.Dropout(0.0)
        self.input_corruption = 0.0  # ν_0: masking noise on the pixels while fine-tuning
        self.max_shift = 0  # s: random translations of the images while fine-tuning
        self.mode: Mode = "finetune"
        self.layer = len(cfg.layers)
        self.set_phase("finetune")

    @property
    def num_layers(self) -> int:
        return len(self.encoders)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def set_phase(
        self,
        mode: Mode = "finetune",
        layer: int | None = None,
        dropout: float = 0.0,
        input_corruption: float = 0.0,
        max_shift: int = 0,
    ) -> StackedAutoencoder:
        """Train layer `layer` (1-based) as an autoencoder, fine-tune the stack with its head, or probe the head;
        `dropout`, `input_corruption` (masking noise on x) and `max_shift` (random translations of x) act while
        fine-tuning only."""
        if mode not in ("pretrain", "finetune", "probe"):
            raise ValueError(f"unknown phase {mode!r}: pretrain, finetune or probe")
        if mode == "pretrain" and not (layer and 1 <= layer <= self.num_layers):
            raise ValueError(f"pretrain needs a layer in 1..{self.num_layers}, got {layer}")
        self.mode, self.layer = mode, layer if mode == "pretrain" else self.num_layers
        self.dropout.p = dropout if mode == "finetune" else 0.0
        self.input_corruption = input_corruption if mode == "finetune" else 0.0
        self.max_shift = max_shift if mode == "finetune" else 0
        trained = {
            "pretrain": [self.encoders[self.layer - 1], self.decoders[self.layer - 1]] if mode == "pretrain" else [],
            "finetune": [self.encoders, self.head],
            "probe": [self.head],
        }[mode]
        self.requires_grad_(False)
        for module in trained:
            module.requires_grad_(True)
        return self

    # ------------------------------------------------------------ the maths

    def features(self, x: Tensor, upto: int | None = None) -> Tensor:
        """h_k for k = `upto` (default L): x flattened through encoders 1..k, without corruption (dropout after
        each layer is active only while fine-tuning)."""
        h = x.flatten(1)
        for encoder in self.encoders[: self.num_layers if upto is None else upto]:
            h = self.dropout(encoder(h))
        return h

    def decode_layer(self, k: int, h: Tensor) -> Tensor:
        """ĥ_{k-1} = g_k(W'_k h_k + b'_k): sigmoid into pixel space for k = 1, linear above."""
        out = self.decoders[k - 1](h)
        return torch.sigmoid(out) if k == 1 else out

    def decode(self, h: Tensor, top: int | None = None) -> Tensor:
        """h_top back to an image through decoders top..1, shape (B, C, H, W)."""
        for k in range(self.num_layers if top is None else top, 0, -1):
            h = self.decode_layer(k, h)
        return h.reshape(-1, *self.image_shape)

    def reconstruct(self, x: Tensor) -> Tensor:
        """x through the whole stack and back: decode(h_L(x))."""
        return self.decode(self.features(x))

    def encode(self, x: Tensor) -> Tensor:
        """The top features h_L(x), (B, d_L)."""
        return self.features(x)

    def corrupt(self, h: Tensor, generator: torch.Generator | None = None, nu: float | None = None) -> Tensor:
        """Masking noise: h̃ = h ⊙ m, m_i ~ Bernoulli(1 - ν), in training only (ν: `corruption` unless given)."""
        nu = self.cfg.corruption if nu is None else nu
        if not self.training or nu == 0:
            return h
        keep = torch.rand(h.shape, device=h.device, generator=generator) >= nu
        return h * keep

    def layer_error(self, x: Tensor, k: int) -> Tensor:
        """Per-sample mean squared reconstruction error of layer k on clean inputs: mean_i (ĥ_{k-1} - h_{k-1})²."""
        h = self.features(x, upto=k - 1)
        return (self.decode_layer(k, self.encoders[k - 1](h)) - h).pow(2).mean(dim=1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, *, step=None, labels=None) -> ModelOutput:
        """The current phase's loss: layer k's reconstruction (pretrain), or the cross-entropy of `labels` (B,)
        (finetune, probe; without labels, only the logits). `step`: the common interface, unused."""
        if self.mode == "pretrain":
            return self._pretrain_step(x, generator)
        if self.training:
            x = translate(x, self.max_shift, generator)
        return self._classify(self.corrupt(x, generator, nu=self.input_corruption), labels)

    def _pretrain_step(self, x: Tensor, generator: torch.Generator | None) -> ModelOutput:
        k = self.layer
        with torch.no_grad():  # layers 1..k-1 are frozen: their outputs are this layer's data
            h = self.features(x, upto=k - 1)
        h_hat = self.decode_layer(k, self.encoders[k - 1](self.corrupt(h, generator)))
        recon_mse = F.mse_loss(h_hat, h)
        with torch.no_grad():  # back to pixels through the frozen decoders, for grids and image metrics
            recon = self.decode(h_hat, top=k - 1) if k > 1 else h_hat.reshape(-1, *self.image_shape)
        return ModelOutput(recon=recon, losses={"recon": recon_mse}, metrics={"recon_mse": recon_mse.detach()})

    def _classify(self, x: Tensor, labels: Tensor | None) -> ModelOutput:
        if self.mode == "probe":
            with torch.no_grad():
                h = self.features(x)
        else:
            h = self.features(x)
        logits = self.head(h)
        recon = None if self.training else self.decode(h.detach())  # the stack's reconstruction, evaluation only
        if labels is None:
            return ModelOutput(recon=recon, losses={}, metrics={}, logits=logits)
        ce = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return ModelOutput(recon=recon, losses={"ce": ce}, metrics={"accuracy": accuracy.detach()}, logits=logits)


def translate(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image of x (B, C, H, W) moved by its own random whole-pixel offset (dy, dx) ∈ [−s, s]², s = `max_shift`,
    with zeros shifted in: x̃[c, i, j] = x[c, i + dy, j + dx] (0 outside the image)."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s))
    dy, dx = torch.randint(0, 2 * s + 1, (2, n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * s)
    cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)
