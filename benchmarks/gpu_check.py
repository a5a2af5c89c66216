"""GPU smoke check: prepare → shard → train (Ray Train, use_gpu, NCCL) → evaluate on the bundled digits.

    python benchmarks/gpu_check.py --workers 1 --epochs 3 --models vae vqvae simvq resvae_gan

Needs a CUDA machine; prints the device, the process-group backend and each model's figures (the codebook
families also exercise the quantizer's all-reduced EMA and k-means on CUDA). Tracking is off (no MLflow
needed). Exits non-zero on errors only. `--cpu` runs the same on CPU (gloo), to check the script where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["vae", "vqvae", "simvq", "resvae_gan"])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (gloo): checks the script where no GPU is")
    args = ap.parse_args()
    if args.cpu:
        print(f"torch {torch.__version__}, CPU")
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    else:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, nccl {torch.cuda.nccl.version()}")

    from latentzoo.config import validate_params
    from latentzoo.stages.evaluate import evaluate_stage
    from latentzoo.stages.prepare import prepare_stage
    from latentzoo.stages.shard import shard_stage
    from latentzoo.training.trainer import TrainOutputs, train_model

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(num_workers=args.workers, use_gpu=not args.cpu, epochs=args.epochs)
    raw["tracking"]["enabled"] = False
    with tempfile.TemporaryDirectory(prefix="lz-gpu-") as d:
        work = Path(d)
        raw["ray"]["storage_path"] = str(work / "ray")
        params = validate_params(raw)
        prepare_stage(params, work / "prepared")
        shard_stage(params, work / "prepared", work / "shards")
        for model in args.models:
            out = TrainOutputs(work / f"models/{model}", work / f"{model}.json", work / f"{model}.csv")
            start = time.perf_counter()
            final = train_model(params, model, work / "shards", out, root=work)
            wall = time.perf_counter() - start
            test = evaluate_stage(
                params, out.model_dir, work / "shards", work / f"{model}-test.json", work / f"plots/{model}"
            )
            shown = {
                k: v
                for k, v in test.items()
                if k in ("test_neg_elbo", "test_mse", "test_psnr", "test_utilisation", "test_perplexity")
            }
            print(
                json.dumps(
                    {
                        "model": model,
                        "train_wall_s": wall,
                        "epochs": final["epochs"],
                        "val_loss": final["val_loss"],
                        "replicas_in_sync": final["replicas_in_sync"],
                        "steps": [final["steps_min"], final["steps_max"]],
                        **shown,
                    },
                    indent=2,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
