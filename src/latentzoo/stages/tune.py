"""The tune@<model> stage: Ray Tune searches a family's loss weights."""

from __future__ import annotations

from pathlib import Path

from latentzoo.config import Params
from latentzoo.tuning.search import tune_model


def tune_stage(params: Params, model_name: str, shard_dir: Path, out_file: Path) -> dict:
    best = tune_model(params, model_name, Path(shard_dir), Path(out_file))
    if not best["searched"]:
        print(f"tune: {model_name}: no search ({best['reason']}); training uses params.yaml's weights")
    else:
        weights = ", ".join(f"{k} {v:.4g}" for k, v in best["weights"].items())
        trials = best["trials"]
        print(
            f"tune: {model_name}: best {best['metric']} {best['best_value']:.4g} with {weights} "
            f"({trials['total']} trials, {trials['stopped_early']} stopped early, {trials['errored']} errored) "
            f"→ {out_file}"
        )
    return best
