"""Stacked autoencoder without Ray: shapes through the stack, what each phase trains and freezes, losses falling,
the label budget, and config errors."""

from __future__ import annotations

import pytest
import torch

from latentzoo.data.loader import count_labelled, eval_batches, labelled, train_batches
from latentzoo.data.shards import load_manifest, shard_urls
from latentzoo.errors import ConfigError
from latentzoo.models import build_model

SMALL = {"stacked_ae.layers": [32, 16, 24], "stacked_ae.corruption": 0.2}


@pytest.fixture
def stack(tiny_params):
    torch.manual_seed(0)
    return build_model("stacked_ae", tiny_params(**SMALL).stacked_ae, (1, 8, 8))


def digits_batch(digits_shards, n=256):
    urls = shard_urls(digits_shards, load_manifest(digits_shards), "train")
    return next(iter(eval_batches(urls, batch_size=n)))


def test_shapes_through_the_stack(stack):
    x = torch.rand(5, 1, 8, 8)
    assert [tuple(stack.features(x, upto=k).shape) for k in range(4)] == [(5, 64), (5, 32), (5, 16), (5, 24)]
    assert stack.decode(stack.features(x)).shape == (5, 1, 8, 8)
    stack.set_phase("finetune").eval()
    out = stack(x, labels=torch.arange(5))
    assert out.logits.shape == (5, 10) and out.recon.shape == (5, 1, 8, 8) and set(out.losses) == {"ce"}
    stack.set_phase("pretrain", layer=2).train()
    out = stack(x)
    assert out.recon.shape == (5, 1, 8, 8) and set(out.losses) == {"recon"}


def test_each_phase_trains_only_its_own_parameters(stack):
    def trained(model):  # "encoders.1.0.weight" → "encoders.1", "head.bias" → "head"
        return {
            ".".join(name.split(".")[:2]) if name.startswith(("encoders", "decoders")) else name.split(".")[0]
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    assert trained(stack.set_phase("pretrain", layer=2)) == {"encoders.1", "decoders.1"}
    assert trained(stack.set_phase("finetune")) == {"encoders.0", "encoders.1", "encoders.2", "head"}
    assert trained(stack.set_phase("probe")) == {"head"}
    x, labels = torch.rand(3, *stack.image_shape), torch.tensor([0, 1, 2])
    assert set(stack.set_phase("pretrain", layer=1)(x, labels=labels).losses) == {"recon"}  # labels unused
    assert set(stack.set_phase("probe")(x, labels=labels).losses) == {"ce"}


def test_earlier_layers_do_not_change_while_a_later_layer_pretrains(stack, digits_shards):
    x, _ = digits_batch(digits_shards)
    stack.set_phase("pretrain", layer=2).train()
    before = {k: v.clone() for k, v in stack.state_dict().items()}
    opt = torch.optim.Adam([p for p in stack.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = stack(x).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = stack.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"encoders.1.0.weight", "encoders.1.0.bias", "decoders.1.weight", "decoders.1.bias"}
    assert losses[-1] < 0.5 * losses[0]


def test_fine_tuning_learns_the_digits(stack, digits_shards):
    x, y = digits_batch(digits_shards, n=512)
    stack.set_phase("finetune", dropout=0.1).train()
    opt = torch.optim.Adam([p for p in stack.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(100):
        loss = stack(x, labels=y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    stack.eval()
    assert stack(x, labels=y).metrics["accuracy"] > 0.9  # chance is 0.1


def test_masking_noise_only_in_training(stack):
    h = torch.ones(1000, 64)
    stack.train()
    masked = 1 - stack.corrupt(h).mean().item()
    assert masked == pytest.approx(0.2, abs=0.05)
    stack.eval()
    assert torch.equal(stack.corrupt(h), h)


def test_input_corruption_masks_pixels_only_while_fine_tuning(stack):
    x = torch.rand(256, 1, 8, 8) + 0.1
    seen = []  # what the first encoder receives
    stack.encoders[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    stack.set_phase("finetune", input_corruption=0.3).train()
    stack(x)
    assert (seen.pop() == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)
    stack.eval()
    stack(x)
    assert torch.equal(seen.pop(), x.flatten(1))  # evaluation sees the clean image
    stack.set_phase("probe", input_corruption=0.3).train()
    stack(x)
    assert torch.equal(seen.pop(), x.flatten(1))  # so does the linear probe


def test_translate_moves_each_image_by_its_own_offset_within_the_bound():
    from latentzoo.models.stacked_ae import translate

    x = torch.zeros(64, 2, 8, 8)
    x[:, :, 3:5, 3:5] = torch.rand(64, 2, 2, 2) + 0.1  # content inside a 3-pixel border: no shift loses any of it
    moved = translate(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        crops = {(a, b): padded[i, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)}
        found = [offset for offset, crop in crops.items() if torch.equal(crop, moved[i])]
        assert found, f"image {i} is not a translate of its input by at most 2 pixels"
        offsets.add(found[0])
    assert len(offsets) > 10  # offsets differ between images (25 possible)
    assert torch.equal(translate(x, 0), x)


def test_max_shift_translates_only_while_fine_tuning(stack):
    x = torch.zeros(32, 1, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0
    seen = []
    stack.encoders[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    stack.set_phase("finetune", max_shift=1).train()
    stack(x, torch.Generator().manual_seed(0))
    assert not torch.equal(seen.pop(), x.flatten(1))
    stack.eval()
    stack(x)
    assert torch.equal(seen.pop(), x.flatten(1))  # evaluation sees the image where it is
    stack.set_phase("probe", max_shift=1).train()
    stack(x)
    assert torch.equal(seen.pop(), x.flatten(1))  # so does the linear probe


def test_a_phase_needs_a_valid_layer(stack):
    with pytest.raises(ValueError, match="pretrain needs a layer in 1..3, got 4"):
        stack.set_phase("pretrain", layer=4)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([500, 0], "stacked_ae.layers: every layer size must be >= 1, got \\[500, 0\\]"),
        ([], "stacked_ae.layers"),
        ("500-500", "stacked_ae.layers"),
    ],
)
def test_a_bad_layer_spec_is_a_config_error(tiny_params, layers, message):
    with pytest.raises(ConfigError, match=message):
        tiny_params(**{"stacked_ae.layers": layers})


def test_stacked_ae_is_not_a_train_stage_model(tiny_params):
    with pytest.raises(ConfigError, match="'stacked_ae' has its own stages"):
        tiny_params(models=["vae", "stacked_ae"])


def test_label_budget_is_a_fixed_subset(digits_shards, node_cache):
    keys = [f"train-{i:07d}" for i in range(5000)]
    kept = [k for k in keys if labelled(k, 0.1, seed=0)]
    assert 400 < len(kept) < 600
    assert kept == [k for k in keys if labelled(k, 0.1, seed=0)]  # deterministic
    assert kept != [k for k in keys if labelled(k, 0.1, seed=1)]
    assert all(labelled(k, 1.0, seed=0) for k in keys[:10])

    urls = shard_urls(digits_shards, load_manifest(digits_shards), "train")
    n = count_labelled("train", 1258, 0.25, seed=0)
    for cache in (None, node_cache):
        batches = train_batches(
            urls,
            steps=3,
            batch_size=n,
            rank=0,
            world_size=1,
            seed=0,
            epoch=0,
            shuffle_buffer=0,
            cache=cache,
            label_fraction=0.25,
        )
        sizes = {tuple(torch.sort(x.flatten(1).sum(1))[0].tolist()) for x, _ in batches}
        assert len(sizes) == 1  # every pass holds exactly the same n labelled images
