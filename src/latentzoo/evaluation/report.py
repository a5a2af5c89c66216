"""The cross-model report (report stage): one table of test metrics for every model, and its image grids."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import shutil
from pathlib import Path

from latentzoo.atomic import atomic_dir, json_text
from latentzoo.evaluation.figures import save_training_curves

# Column order of the table; a metric a family does not define is shown as "–".
COLUMNS = [
    ("test_mse", "MSE"),
    ("test_psnr", "PSNR (dB)"),
    ("test_ssim", "SSIM"),
    ("test_active_units", "active units"),
    ("test_utilisation", "codebook used"),
    ("test_perplexity", "code perplexity"),
    ("test_fcd_samples", "FCD samples"),
    ("test_fcd_recon", "FCD recon"),
    ("test_sharpness_samples", "sharpness samples (data = 1)"),
    ("test_sharpness_recon", "sharpness recon (data = 1)"),
    ("test_mean_sigma", "mean σ"),
    ("test_collapsed_dims", "collapsed dims"),
    ("fit_time_s", "train time (s)"),
    ("epochs", "epochs"),
]

# The likelihood table, for the families that have one; `test_binarized` says which data it is over.
LIKELIHOOD_COLUMNS = [
    ("test_neg_elbo", "−ELBO, 1 sample (nats)"),
    ("test_nll", "NLL, importance-sampled (nats)"),
    ("test_nll_samples", "k"),
    ("test_kl", "KL (nats)"),
]
LIKELIHOOD_DATA = {1: "binarised (dynamic, one fixed draw)", 0: "grey levels (Bernoulli cross-entropy)"}
PROTOCOL = (
    "Reconstruction figures: the decoder mean at the posterior mean (or the chosen codes) of the unmodified "
    "test image, for every family. Likelihoods compare only within one kind of data."
)


# The grids of each model shown side by side: (column title, file in plots/evaluate/<model>/).
GRIDS = [
    ("test reconstructions (top: data, bottom: model)", "reconstructions.png"),
    ("samples from the prior", "samples.png"),
    ("codebook usage on the test split", "codebook_usage.png"),
]


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def collect(models: list[str], eval_dir: Path, train_dir: Path) -> dict[str, dict]:
    """{model: train metrics | test metrics} from the JSON files the train and evaluate stages wrote."""
    rows = {}
    for name in models:
        row = {}
        for path in (train_dir / f"{name}.json", eval_dir / f"{name}.json"):
            if path.exists():
                row.update(json.loads(path.read_text()))
        rows[name] = row
    return rows


def stacked_section(stacked: dict) -> list[str]:
    """The stacked autoencoder's classification table (fine-tuned, random-init baseline, linear probe) and its
    per-layer reconstruction errors."""
    lines: list[str] = []
    finetune, pretrain = stacked.get("finetune"), stacked.get("pretrain")
    if finetune:
        fraction, labelled = finetune.get("label_fraction"), finetune.get("labelled_images")
        lines += [
            "",
            "## stacked_ae: classification",
            "",
            f"Test accuracy with {_cell(fraction)} of the training labels ({_cell(labelled)} images), "
            f"{_cell(finetune.get('epochs'))} epochs each.",
            "",
            "| variant | test accuracy |",
            "|---|---|",
        ]
        for key, title in (
            ("test_accuracy", "pretrained + fine-tuned"),
            ("test_accuracy_random", "random init"),
            ("test_accuracy_probe", "linear probe (frozen pretrained features)"),
        ):
            if key in finetune:
                lines.append(f"| {title} | {_cell(finetune[key])} |")
    if pretrain:
        layers = sorted(k for k in pretrain if k.startswith("test_recon_mse_layer"))
        lines += [
            "",
            "## stacked_ae: layer-wise pretraining",
            "",
            f"Layers {pretrain.get('layers')}, {_cell(pretrain.get('epochs_per_layer'))} epochs each. "
            "Test reconstruction error of each layer's autoencoder on its clean inputs:",
            "",
            "| layer | test MSE |",
            "|---|---|",
        ]
        lines += [f"| {k.removeprefix('test_recon_mse_layer')} | {_cell(pretrain[k])} |" for k in layers]
    return lines


def likelihood_section(rows: dict[str, dict]) -> list[str]:
    """−ELBO and the importance-sampled NLL of the families with a likelihood, each labelled with its data."""
    found = {name: row for name, row in rows.items() if "test_binarized" in row}
    if not found:
        return []
    lines = ["", "## Likelihood (nats per test image; lower is better)", ""]
    lines.append("| model | data | " + " | ".join(title for _, title in LIKELIHOOD_COLUMNS) + " |")
    lines.append("|---|---|" + "---|" * len(LIKELIHOOD_COLUMNS))
    for name, row in found.items():
        cells = [_cell(row.get(key)) for key, _ in LIKELIHOOD_COLUMNS]
        lines.append(f"| {name} | {LIKELIHOOD_DATA[int(row['test_binarized'])]} | " + " | ".join(cells) + " |")
    return lines


def read_curves(models: list[str], curves_dir: Path | None) -> dict[str, list[dict]]:
    """{model: per-epoch rows} from the train stage's plots CSVs (plots/train/<model>.csv), where present."""
    found = {}
    for name in models:
        path = Path(curves_dir) / f"{name}.csv" if curves_dir else None
        if path and path.exists():
            with path.open() as f:
                rows = list(csv.DictReader(f))
            found[name] = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]
    return found


def render_markdown(
    rows: dict[str, dict],
    images: dict[str, dict[str, str]],
    mlflow_hint: str,
    stacked: dict | None = None,
    curves: str | None = None,
) -> str:
    lines = ["# latentzoo report", "", "Test-split metrics of every model trained by the pipeline.", "", PROTOCOL, ""]
    lines.append("| model | " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|---|" + "---|" * len(COLUMNS))
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    lines += likelihood_section(rows)
    lines += stacked_section(stacked or {})
    if images:  # one row per model, its grids side by side
        lines += [
            "",
            "## Images",
            "",
            "| model | " + " | ".join(title for title, _ in GRIDS) + " |",
            "|---|" + "---|" * len(GRIDS),
        ]
        for name, pictures in images.items():
            cells = [f"![{name} {title}]({pictures[file]})" if file in pictures else "–" for title, file in GRIDS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if curves:
        lines += ["", "## Training curves", "", f"![training curves]({curves})"]
    lines += ["", mlflow_hint, ""]
    return "\n".join(lines)


def markdown_to_html(text: str, base: Path) -> str:
    """The report's Markdown (headings, tables, paragraphs, images) as one self-contained HTML page: every
    image is embedded as a data URI, so the page can be mailed or opened from MLflow's artifact view."""

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: image(m.group(1), m.group(2)), s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    def image(alt: str, rel: str) -> str:
        data = base64.b64encode((base / rel).read_bytes()).decode()
        return f'<img alt="{alt}" src="data:image/png;base64,{data}">'

    body, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # skip the |---| separator
                table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, *rows = table
            body.append(
                "<table><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            table = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line.strip())}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{image-rendering:pixelated}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>latentzoo report</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def build_report(
    models: list[str],
    eval_dir: Path,
    train_dir: Path,
    plots_dir: Path,
    out_dir: Path,
    mlflow_hint: str = "",
    stacked: dict | None = None,
    curves_dir: Path | None = None,
) -> Path:
    """Write `out_dir/report.md` with copies of the grids it shows and the training curves of `curves_dir`
    (the train stage's per-epoch CSVs), and `report.html` with every image embedded."""
    rows = collect(models, Path(eval_dir), Path(train_dir))
    histories = read_curves(models, curves_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()  # a DVC output of its own, even when empty
        curves = None
        if histories:
            save_training_curves(histories, tmp / "images" / "training_curves.png")
            curves = "images/training_curves.png"
        images: dict[str, dict[str, str]] = {}  # {model: {file: path relative to the report}}
        for name in models:
            for _, file in GRIDS:
                src = Path(plots_dir) / name / file
                if src.exists():
                    shutil.copyfile(src, tmp / "images" / f"{name}-{file}")
                    images.setdefault(name, {})[file] = f"images/{name}-{file}"
        markdown = render_markdown(rows, images, mlflow_hint, stacked, curves)
        (tmp / "report.md").write_text(markdown)
        (tmp / "report.html").write_text(markdown_to_html(markdown, tmp))
        everything = rows | ({"stacked_ae": stacked} if stacked else {})
        (tmp / "metrics.json").write_text(json_text(everything))
    return Path(out_dir) / "report.md"
