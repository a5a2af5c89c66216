"""Held-out evaluation of a trained model on the test shards (evaluate stage), one protocol for every family.

Reconstructions x̂ = model.reconstruct(x) of the *unmodified* test image: the decoder mean at the posterior mean,
or at the chosen codes; no sampling, no binarisation. Likelihood figures only for families with a likelihood
(`Variational`), on the data that likelihood is over: dynamically binarised images (one fixed draw per
evaluation, `binarized` = 1) or grey levels (`binarized` = 0), never compared across the two.

Metrics, all means over the test split:
  neg_elbo (nats/image) = E[-log p(x|z)] + KL(q(z|x) || p(z)), one sample of z,
  nll (nats/image) = the importance-sampled bound with k = `evaluate.nll_samples` samples (`likelihood`),
  mse = mean (x - x̂)²,  psnr = 10·log10(1 / mse),  ssim (Wang et al. 2004),
  active_units = #{d : Var_x(E_q[z_d | x]) > threshold}  (Burda et al., arXiv 1509.00519),
  fid_samples / fid_recon (on the classifier stage's features), kid_samples, precision / recall / density /
  coverage of samples, sharpness_samples / sharpness_recon, all against the test images (`quality`),
  and for families with a codebook: utilisation = #{codes used} / K over the whole split, perplexity = exp(H(p))
  of the code histogram p, dead_codes = K - #{codes used}.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from latentzoo.checkpoint import load_model
from latentzoo.config import Params
from latentzoo.data.loader import eval_batches
from latentzoo.data.shards import checked_shards
from latentzoo.evaluation import metrics as M
from latentzoo.evaluation.feature_classifier import load_classifier
from latentzoo.evaluation.figures import save_usage_histogram
from latentzoo.evaluation.grids import write_grids
from latentzoo.evaluation.likelihood import importance_sampled_nll
from latentzoo.evaluation.quality import quality_metrics
from latentzoo.models import Coded, Generative, Variational
from latentzoo.models.quantizer import CodeCounter


@torch.no_grad()
def evaluate_model(
    params: Params,
    model_path: Path,
    shard_dir: Path,
    progress: bool = True,
    figures_dir: Path | None = None,
    classifier_path: Path | None = None,
) -> dict:
    """Test-split metrics of the model in `model_path`. With `figures_dir`, grids of
    test reconstructions and prior samples there (`write_grids`), and a family with a codebook gets its usage
    histogram (codebook_usage.png); with `classifier_path` (the classifier stage's network), FID, KID,
    precision/recall/density/coverage and sharpness of reconstructions and samples (`evaluation.quality`)."""
    manifest, split_urls = checked_shards(shard_dir, ("test",))
    urls = split_urls["test"]
    model, meta = load_model(model_path)
    generator = torch.Generator().manual_seed(params.seed)  # the same binarisation / ε for every evaluation
    sums: dict[str, float] = defaultdict(float)
    means, count = [], 0
    quality_n = params.classifier.num_samples
    real, recons = [], []  # the first quality_n test images and their reconstructions
    codes = CodeCounter(model.codebook_size) if isinstance(model, Coded) else None
    bar = tqdm(
        total=manifest["splits"]["test"]["count"],
        desc=f"evaluate {meta['model_name']}",
        unit="img",
        disable=not progress,
    )
    variational = isinstance(model, Variational)
    k = params.evaluate.nll_samples if variational else 0
    for x, _ in eval_batches(urls, batch_size=params.evaluate.batch_size):
        data = torch.bernoulli(x, generator=generator) if variational and model.binarizes else x
        out = model(data, generator=generator)  # the loss terms (binarising x again leaves it as it is)
        recon = model.reconstruct(x)
        n = len(x)
        per_image = {"mse": M.mse(recon, x), "psnr": M.psnr(recon, x), "ssim": M.ssim(recon, x)}
        if k:
            per_image["nll"] = importance_sampled_nll(model, data, k, generator)
        for name, value in out.metrics.items():
            if name not in per_image:  # a family's own batch-mean "mse" is the same figure: count it once
                sums[name] += float(value) * n
        for name, values in per_image.items():
            sums[name] += float(values.sum())
        sums["loss"] += float(out.total) * n
        if codes:
            codes.add(out.codes)
        if variational:
            means.append(model.encode(x))  # the posterior means
        if count < quality_n:
            real.append(x[: quality_n - count])
            recons.append(recon[: quality_n - count])
        count += n
        bar.update(n)
    bar.close()
    result = {f"test_{k}": v / count for k, v in sorted(sums.items())}
    if means:
        result["test_active_units"] = M.active_units(torch.cat(means), params.evaluate.active_unit_threshold)
    if codes:
        result |= {f"test_{k}": v for k, v in codes.usage().items()}
        if figures_dir is not None:
            save_usage_histogram(
                codes.counts, Path(figures_dir) / "codebook_usage.png", f"{meta['model_name']}, test split"
            )
    if classifier_path is not None:
        samples = model.sample(len(torch.cat(real)), generator=generator) if isinstance(model, Generative) else None
        classifier = load_classifier(classifier_path)
        quality = quality_metrics(classifier, torch.cat(real), torch.cat(recons), samples, params.seed)
        result |= {f"test_{k}": v for k, v in quality.items()}
    result["test_images"] = count
    if variational:
        result["test_binarized"] = int(model.binarizes)  # the data the likelihood figures are over
        result["test_nll_samples"] = k
    if figures_dir is not None:
        write_grids(model, urls, Path(figures_dir), params.evaluate.grid_size, params.seed)
    return result
