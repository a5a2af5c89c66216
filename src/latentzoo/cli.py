"""`latentzoo sample | reconstruct | encode`: use a trained model from a DVC output, an MLflow run or the registry.

    latentzoo sample      --model models:/latentzoo-vae/latest -n 64 -o samples.png
    latentzoo reconstruct --model models/vqvae --images a.png b.png -o recon.png     (or --shards data/shards)
    latentzoo encode      --model runs:/<run id>/model --shards data/shards -n 1000 -o codes.npy
    latentzoo compare     HEAD~1            (params and metrics changed since, via dvc params/metrics diff)
    latentzoo submit      --address http://<head>:8265 --results <shared dir or URI> -- dvc repro train@vae

`encode` writes the posterior means for the VAE, code indices for VQ-VAE / SimVQ, the top features for the
stacked autoencoder. Any bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from latentzoo.atomic import atomic_write_bytes
from latentzoo.data.loader import eval_batches, to_float
from latentzoo.data.shards import checked_shards
from latentzoo.errors import LatentzooError, cli_errors
from latentzoo.evaluation.grids import save_grid
from latentzoo.models import Generative
from latentzoo.submit import submit
from latentzoo.tracking.models import Reconstructor, load


def read_images(files: list[Path], image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Image files → (N, C, H, W) in [0, 1]; an image of another size or channel count is a clear error."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = image_shape
    images = []
    for path in files:
        try:
            with Image.open(path) as im:  # grey stays grey and colour stays colour: channels are checked below
                grey = im.mode in ("L", "LA", "1", "I", "I;16")
                array = np.asarray(im if im.mode in ("L", "RGB") else im.convert("L" if grey else "RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise LatentzooError(f"{path}: not a readable image ({err})") from None
        array = array[..., None] if array.ndim == 2 else array
        if array.shape != (h, w, c):
            raise LatentzooError(
                f"{path}: image is {array.shape[1]}x{array.shape[0]} with {array.shape[2]} "
                f"channel(s); the model takes {w}x{h} with {c}"
            )
        images.append(array)
    return to_float(np.stack(images))


def read_shards(shard_dir: Path, split: str, n: int) -> torch.Tensor:
    """The first `n` images of a split of the pipeline's shards (checked against the manifest)."""

    _, urls = checked_shards(shard_dir, (split,))
    batches, count = [], 0
    for x, _ in eval_batches(urls[split], batch_size=min(n, 256)):
        batches.append(x)
        count += len(x)
        if count >= n:
            break
    return torch.cat(batches)[:n]


def inputs(args, model) -> torch.Tensor:
    if args.images:
        return read_images(args.images, tuple(model.image_shape))
    if args.shards:
        x = read_shards(args.shards, args.split, args.n)
        if tuple(x.shape[1:]) != tuple(model.image_shape):
            raise LatentzooError(
                f"{args.shards}: images are {tuple(x.shape[1:])}, the model takes {tuple(model.image_shape)}"
            )
        return x
    raise LatentzooError("give the images: --images FILE ... or --shards DIR")


@torch.no_grad()
def sample(args) -> Path:

    model = load(args.model)
    if not isinstance(model, Generative):
        raise LatentzooError(f"{args.model}: a {type(model).__name__} has no prior to sample from")
    images = model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    return save_grid(images, args.out, scale=max(1, 256 // (images.shape[-1] * 8)))


@torch.no_grad()
def reconstruct(args) -> Path:

    model = load(args.model)
    x = inputs(args, model)
    recon = Reconstructor(model).eval()(x)
    return save_grid(torch.cat([x, recon]), args.out, nrow=min(len(x), 16), scale=max(1, 256 // (x.shape[-1] * 8)))


@torch.no_grad()
def encode(args) -> Path:

    model = load(args.model)
    codes = model.encode(inputs(args, model)).cpu().numpy()
    import io

    buffer = io.BytesIO()
    np.save(buffer, codes)
    atomic_write_bytes(Path(args.out), buffer.getvalue())
    return Path(args.out)


def compare(args) -> str:
    """What changed between two pipeline runs (git revisions or DVC experiments; the second defaults to the
    workspace): `dvc params diff` and `dvc metrics diff`, printed as one table."""
    import json
    import subprocess

    dvc = str(Path(sys.executable).with_name("dvc"))
    revs = [r for r in (args.a_rev, args.b_rev) if r]
    diffs = {}
    for kind in ("params", "metrics"):
        proc = subprocess.run([dvc, kind, "diff", *revs, "--all", "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LatentzooError(
                f"dvc {kind} diff {' '.join(revs)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            )
        diffs[kind] = json.loads(proc.stdout or "{}")
    lines = [f"{args.a_rev or 'HEAD'} → {args.b_rev or 'workspace'}"]
    for kind, files in diffs.items():
        changed = [(f, k, v) for f, keys in files.items() for k, v in keys.items() if v.get("old") != v.get("new")]
        lines.append(f"{kind}: {len(changed)} changed")
        for file, key, value in changed:
            delta = f"  ({value['diff']:+.4g})" if isinstance(value.get("diff"), (int, float)) else ""
            lines.append(f"  {file}  {key}: {_short(value.get('old'))} → {_short(value.get('new'))}{delta}")
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="latentzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = ap.add_subparsers(dest="command", required=True)
    for name, run, help_ in (
        (sample.__name__, sample, "a grid of samples from the prior (PNG)"),
        (reconstruct.__name__, reconstruct, "inputs above their reconstructions (PNG)"),
        (encode.__name__, encode, "latents or code indices (.npy)"),
    ):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--model", required=True, help="models/<family>, runs:/<id>/model or models:/<name>/<v>")
        sub.add_argument("-n", type=int, default=64, help="images to sample, or to read from --shards")
        sub.add_argument("-o", "--out", type=Path, required=True)
        if name == "sample":
            sub.add_argument("--seed", type=int, default=0)
        else:
            sub.add_argument("--images", type=Path, nargs="+", help="image files (PNG, JPEG)")
            sub.add_argument("--shards", type=Path, help="the pipeline's shards folder")
            sub.add_argument("--split", default="test", choices=("train", "val", "test"))
        sub.set_defaults(run=run)
    diff = commands.add_parser("compare", help="params and metrics changed between two pipeline runs (dvc diff)")
    diff.add_argument("a_rev", nargs="?", default=None, help="git revision or DVC experiment (default: HEAD)")
    diff.add_argument("b_rev", nargs="?", default=None, help="git revision or DVC experiment (default: workspace)")
    diff.set_defaults(run=compare, n=1)
    job = commands.add_parser("submit", help="run stages on a Ray cluster as a job; bring the outputs back")
    job.add_argument("--address", default=None, help="the job server, http://<head>:8265 (default: RAY_ADDRESS)")
    job.add_argument(
        "--results",
        required=True,
        help="where the job packs its outputs: a path the cluster and this machine share, or a URI",
    )
    job.add_argument("--runtime-env", type=Path, default=None, help="runtime-env YAML (e.g. pip packages)")
    job.add_argument("job_command", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- dvc repro train@vae")
    job.set_defaults(run=submit_job, n=1)
    return ap


def submit_job(args) -> str:

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    if not command:
        raise LatentzooError("submit: no command given (e.g. -- dvc repro train@vae)")
    return f"latentzoo submit: job {submit(command, args.address, args.results, args.runtime_env)} done"


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.n < 1:
        raise LatentzooError(f"-n must be >= 1, got {args.n}")
    out = args.run(args)
    print(out if args.command in ("compare", "submit") else f"latentzoo {args.command}: wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
