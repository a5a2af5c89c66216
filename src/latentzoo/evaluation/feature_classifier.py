"""The small classifier whose features every model's sample-quality metrics are measured on (`quality`).

FID measures sample quality in the feature space of an ImageNet Inception network; nothing can be downloaded
here and digits are not ImageNet, so the pipeline trains its own feature network on the training split (the
`classifier` stage, a DVC output every evaluation reuses) and gives it to torchmetrics' FID and KID and to prdc
as their feature extractor: "FID (classifier features)", never Inception's. The network: two conv blocks (the
second strided), average pooling to a 4x4 grid, a `feature_dim` layer (the features, after ReLU), and a linear
head over the classes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentzoo.checkpoint import load_state, save_state
from latentzoo.config import ClassifierConfig
from latentzoo.data.loader import eval_batches
from latentzoo.errors import DataError, LatentzooError


class FeatureClassifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),  # a 4x4 grid: where a stroke is matters for digits
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] → (B, feature_dim)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_split(urls: list[str]) -> tuple[Tensor, Tensor]:
    """Every image and label of the shards in `urls`, in memory."""
    xs, ys = zip(*eval_batches(urls, batch_size=1024)) if urls else ((), ())
    if not xs:
        raise DataError(f"no images in the shards {urls}")
    return torch.cat(xs), torch.cat(ys)


def train_classifier(
    cfg: ClassifierConfig, train_urls: list[str], test_urls: list[str], seed: int
) -> tuple[FeatureClassifier, dict]:
    """Train on the training split (Adam, shuffled minibatches); returns the model and its test accuracy."""
    x, y = load_split(train_urls)
    num_classes = int(y.max()) + 1
    torch.manual_seed(seed)
    model = FeatureClassifier(x.shape[1], num_classes, cfg.width, cfg.feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(cfg.batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    x_test, y_test = load_split(test_urls)
    accuracy = float((predict(model, x_test) == y_test).float().mean())
    return model.eval(), {
        "test_accuracy": accuracy,
        "train_time_s": time.perf_counter() - started,
        "num_classes": num_classes,
        "train_images": len(x),
    }


@torch.no_grad()
def predict(model: FeatureClassifier, x: Tensor, batch_size: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch_size)])


@torch.no_grad()
def features(model: FeatureClassifier, x: Tensor, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    return torch.cat([model.features(chunk) for chunk in x.split(batch_size)]).double().numpy()


def save_classifier(model: FeatureClassifier, cfg: ClassifierConfig, image_shape, path: Path) -> None:
    save_state(
        path,
        {
            "format": 1,
            "config": cfg.model_dump(),
            "image_shape": list(image_shape),
            "num_classes": model.head.out_features,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
    )


def load_classifier(path: Path) -> FeatureClassifier:
    record = load_state(Path(path))
    try:
        cfg = ClassifierConfig.model_validate(record["config"])
        model = FeatureClassifier(record["image_shape"][0], record["num_classes"], cfg.width, cfg.feature_dim)
        model.load_state_dict(record["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise LatentzooError(f"{path}: not a latentzoo feature classifier ({type(err).__name__}: {err})") from None
    return model.eval()
