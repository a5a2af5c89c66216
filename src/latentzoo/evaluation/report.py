"""The cross-model report (report stage): test metrics of every model, its image grids and training curves, as
Markdown and as one self-contained HTML page, both rendered from the same context by the Jinja2 templates in
`templates/`."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from latentzoo.atomic import atomic_dir, json_text
from latentzoo.evaluation.figures import save_training_curves

# The per-family tables, in order: (heading, [(metric, column title)]); a metric a family lacks shows "–".
TABLES = [
    (
        "Reconstruction (test split)",
        [
            ("test_mse", "MSE"),
            ("test_psnr", "PSNR (dB)"),
            ("test_ssim", "SSIM"),
            ("test_fid_recon", "FID (classifier features)"),
            ("test_sharpness_recon", "sharpness (data = 1)"),
        ],
    ),
    (
        "Samples from the prior, against as many test images",
        [
            ("test_fid_samples", "FID (classifier features)"),
            ("test_kid_samples", "KID"),
            ("test_precision", "precision"),
            ("test_recall", "recall"),
            ("test_density", "density"),
            ("test_coverage", "coverage"),
            ("test_sharpness_samples", "sharpness (data = 1)"),
        ],
    ),
    (
        "Latents",
        [
            ("test_active_units", "active units"),
            ("test_utilisation", "codebook used"),
            ("test_perplexity", "code perplexity"),
            ("test_mean_sigma", "mean σ"),
            ("test_collapsed_dims", "collapsed dims"),
        ],
    ),
    ("Training", [("fit_time_s", "train time (s)"), ("epochs", "epochs")]),
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


FINETUNE_VARIANTS = [
    ("test_accuracy", "pretrained + fine-tuned"),
    ("test_accuracy_random", "random init"),
    ("test_accuracy_probe", "linear probe (frozen pretrained features)"),
]

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


def report_context(
    rows: dict[str, dict],
    images: dict[str, dict[str, str]],
    mlflow_hint: str,
    stacked: dict | None = None,
    curves: str | None = None,
    links: dict[str, str] | None = None,
) -> dict:
    """What the templates show, as plain values: every number already formatted."""
    likelihood = {name: row for name, row in rows.items() if "test_binarized" in row}
    stacked = stacked or {}
    pretrain = stacked.get("pretrain") or {}
    return {
        "protocol": PROTOCOL,
        "tables": [
            {"heading": heading, "titles": [t for _, t in columns], "rows": table_rows(rows, columns)}
            for heading, columns in TABLES
        ],
        "likelihood": {
            "titles": ["data"] + [t for _, t in LIKELIHOOD_COLUMNS],
            "rows": [
                (
                    name,
                    [LIKELIHOOD_DATA[int(row["test_binarized"])]] + [_cell(row.get(k)) for k, _ in LIKELIHOOD_COLUMNS],
                )
                for name, row in likelihood.items()
            ],
        },
        "finetune": {k: _cell(v) for k, v in (stacked.get("finetune") or {}).items()},
        "finetune_variants": FINETUNE_VARIANTS,
        "pretrain": {k: _cell(v) for k, v in pretrain.items()},
        "layers": [
            (k.removeprefix("test_recon_mse_layer"), [_cell(pretrain[k])])
            for k in sorted(k for k in pretrain if k.startswith("test_recon_mse_layer"))
        ],
        "grid_titles": [title for title, _ in GRIDS],
        "images": [(name, [pictures.get(file) for _, file in GRIDS]) for name, pictures in images.items()],
        "curves": curves,
        "links": links or {},
        "mlflow_hint": mlflow_hint,
    }


def table_rows(rows: dict[str, dict], columns: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    return [(name, [_cell(row.get(key)) for key, _ in columns]) for name, row in rows.items()]


def render(context: dict, base: Path) -> tuple[str, str]:
    """The report as Markdown and as one self-contained HTML page (every image a data URI, so the page can be
    mailed or opened from MLflow's artifact view), from the same context and the templates beside this module."""

    def data_uri(rel: str) -> str:
        return "data:image/png;base64," + base64.b64encode((base / rel).read_bytes()).decode()

    loader = PackageLoader("latentzoo.evaluation", "templates")
    markdown = Environment(loader=loader, undefined=StrictUndefined, keep_trailing_newline=True)
    page = Environment(loader=loader, undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)
    page.filters["data_uri"] = data_uri
    return markdown.get_template("report.md.j2").render(context), page.get_template("report.html.j2").render(context)


def build_report(
    models: list[str],
    eval_dir: Path,
    train_dir: Path,
    plots_dir: Path,
    out_dir: Path,
    mlflow_hint: str = "",
    stacked: dict | None = None,
    curves_dir: Path | None = None,
    links: dict[str, str] | None = None,
) -> Path:
    """Write `out_dir/report.md` with copies of the grids it shows and the training curves of `curves_dir`
    (the train stage's per-epoch CSVs), and `report.html` with every image embedded; `links`: {model: URL of
    its MLflow training run}."""
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
        markdown, page = render(report_context(rows, images, mlflow_hint, stacked, curves, links), tmp)
        (tmp / "report.md").write_text(markdown)
        (tmp / "report.html").write_text(page)
        everything = rows | ({"stacked_ae": stacked} if stacked else {})
        (tmp / "metrics.json").write_text(json_text(everything))
    return Path(out_dir) / "report.md"
