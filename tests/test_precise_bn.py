"""--precise-bn-batches: validation and checkpoints see BatchNorm statistics that fit the weights.

Without it a randomly initialised encoder trained at the demo's learning rate validates on moving
averages that lag its weights (docs/demo.md shows the run where that made the validation loss jump).
"""
import argparse
import copy

import torch

import train
from datasets import CaptionDataset
from models import Encoder
from test_robustness import assert_same_weights, data, raw, train_argv, weights  # noqa: F401 (fixtures)


def batchnorm_buffers(state):
    return {k: v for k, v in state.items() if k.startswith("encoder.") and ("running_" in k or "num_batches" in k)}


def test_recomputed_statistics_are_those_of_the_training_images(data):
    # Oracle: asked for one batch holding every training image, each BatchNorm layer's running mean and
    # variance must be the per-channel mean and (unbiased) variance of what that layer receives when the
    # same images pass through the encoder in training mode, taken here with hooks.
    images = CaptionDataset(data, "train", per_image=True)
    torch.manual_seed(0)
    encoder = Encoder("resnet18", encoded_size=4, pretrained=False, fine_tune=True, cut_after="layer2")
    encoder.train()
    args = argparse.Namespace(data_folder=data, seed=0, batch_size=len(images), captions_per_image_per_step=1,
                              precise_bn_batches=1, amp="none")
    train.recompute_batchnorm_statistics(encoder, args, epoch=0, device=torch.device("cpu"))

    copy_ = copy.deepcopy(encoder).train()
    layers = [m for m in copy_.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = {}
    # A pre-hook, and a copy: what follows the layer (ReLU in place) may overwrite the tensor it read.
    hooks = [m.register_forward_pre_hook(lambda m, inputs: seen.setdefault(m, inputs[0].clone())) for m in layers]
    with torch.no_grad():
        copy_(torch.stack([images[i][0] for i in range(len(images))]))
    for hook in hooks:
        hook.remove()
    recomputed = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(recomputed) == len(layers) == len(seen) > 0
    for layer, mine in zip(layers, recomputed):
        inputs = seen[layer].transpose(0, 1).flatten(1)  # (C, B*H*W)
        torch.testing.assert_close(mine.running_mean, inputs.mean(dim=1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.running_var, inputs.var(dim=1), rtol=1e-4, atol=1e-5)
        assert mine.momentum == 0.1  # restored for training


def test_it_changes_the_statistics_only_and_a_resumed_run_recomputes_the_same(data, tmp_path):
    plain, precise, resumed = tmp_path / "plain", tmp_path / "precise", tmp_path / "resumed"
    train.main(train_argv(data, plain, epochs=2))
    train.main(train_argv(data, precise, "--precise-bn-batches", 2, epochs=2))
    train.main(train_argv(data, resumed, "--precise-bn-batches", 2, epochs=1))
    train.main(train_argv(data, resumed, "--precise-bn-batches", 2, "--resume", resumed / "last.pt", epochs=2))

    a, b = weights(plain / "last.pt"), weights(precise / "last.pt")
    statistics = batchnorm_buffers(a)
    assert statistics and all(not torch.equal(a[k], b[k]) for k in statistics if "running_" in k)
    # Training itself is untouched: no random draw is taken from training's generators.
    assert all(torch.equal(a[k], b[k]) for k in a if k not in statistics)
    assert_same_weights(precise / "last.pt", resumed / "last.pt")
