"""Figures beyond image grids, drawn with matplotlib (Agg) and written atomically as PNG."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from latentzoo.atomic import atomic_write_bytes  # noqa: E402
from latentzoo.models.quantizer import usage_from_counts  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Lay out, render to PNG in memory and write atomically; the figure is closed."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def save_usage_histogram(counts: Tensor, path: Path, title: str) -> Path:
    """Codebook usage: how often each code was chosen, codes sorted from most to least used (log scale), with
    utilisation and perplexity in the title. A flat curve is a well-used codebook; a cliff is collapse."""
    usage = usage_from_counts(counts)
    ranked = counts.double().sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.fill_between(range(1, len(ranked) + 1), ranked, step="post", color="tab:blue", alpha=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlim(1, max(len(ranked), 2))
    ax.set_xlabel("code, most to least used")
    ax.set_ylabel("assignments")
    ax.set_title(
        f"{title}: {usage['utilisation']:.1%} of {len(ranked)} codes used, perplexity {usage['perplexity']:.0f}",
        fontsize=9,
    )
    return save_figure(fig, path)


CURVES = (
    ("train_loss", "train loss", "-"),
    ("val_loss", "val loss", "-"),
    ("train_disc_loss", "discriminator loss", "--"),
)


def save_training_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """One panel per model: its per-epoch train and val objective (and a critic's loss), from the train stage's
    plots CSV. Each family's objective has its own scale (nats, MSE), hence a panel each."""
    fig, axes = plt.subplots(1, len(histories), figsize=(3.2 * len(histories), 2.8), dpi=100, squeeze=False)
    for ax, (name, rows) in zip(axes[0], histories.items()):
        epochs = [row["epoch"] for row in rows]
        for key, label, style in CURVES:
            if any(key in row for row in rows):
                ax.plot(epochs, [row.get(key, float("nan")) for row in rows], style, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    return save_figure(fig, path)
