"""bench.py's own helpers: the random encoder's BatchNorm calibration, the --sections flag, the grouped
speed-ups and the packing table's round-by-round ratios."""
import pytest
import torch

import bench
from models import Encoder


def test_calibrated_random_encoder_keeps_its_activations_small_and_stays_frozen():
    torch.manual_seed(0)
    encoder = Encoder("resnet101", encoded_size=2, pretrained=False, cut_after="layer3").eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = encoder(images).abs().max().item()
    bench.calibrate_batchnorm(encoder, images)
    with torch.no_grad():
        after = encoder(images).abs().max().item()
    # Uncalibrated, the 23 blocks of layer3 grow the features to ~1e4 here (~6e5 from the whole
    # network at 256x256, past fp16's 65504); calibrated, they stay near unit scale.
    assert before > 1000 and after < 100
    layers = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training and m.momentum == 0.1 for m in layers)  # eval mode and torch's momentum again
    assert not torch.allclose(layers[0].running_var, torch.ones_like(layers[0].running_var))


def test_sections_flag_takes_known_names_only(capsys):
    assert bench.parse_args(["--sections", "decoding,ablation"]).sections == ["decoding", "ablation"]
    assert bench.parse_args([]).sections == list(bench.DEFAULT_SECTIONS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "decoding,speed"])
    assert "unknown speed" in capsys.readouterr().err


def test_grouped_speedups_compare_k5_with_k1_in_each_setting():
    def run(fine_tune, per_image, captions_per_s):
        return {"fine_tune": fine_tune, "per_image": per_image, "captions_per_s": captions_per_s}
    grouped = [run(False, 1, 5.0), run(False, 5, 15.0), run(True, 1, 2.0), run(True, 5, 7.0)]
    assert bench.grouped_speedups(grouped) == {"frozen": 3.0, "fine-tuned": 3.5}
    assert bench.parse_args(["--sections", "grouped"]).sections == ["grouped"]


def test_packing_rounds_give_the_lowest_and_highest_ratio_of_the_same_round():
    seconds = {"tutorial_whole": [12.0, 10.0, 9.0], "ours_whole": [3.0, 4.0, 3.0],
               "tutorial_steady": [9.0, 8.0, 10.0], "ours_steady": [3.0, 3.2, 2.5]}
    assert bench.round_speedups(seconds, "whole") == "2.50-4.00x"  # rounds 2 and 1: 10/4 and 12/3
    assert bench.round_speedups(seconds, "steady") == "2.50-4.00x"  # rounds 2 and 3: 8/3.2 and 10/2.5
