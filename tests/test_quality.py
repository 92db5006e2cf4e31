"""A tiny model trained for about a minute on the shapes set must learn the words and the content.

The margins were calibrated on several runs (see the assertion); training this short is sensitive
to float rounding, so they sit below the weakest run seen rather than at a typical one.
"""
import math

import pytest
import torch
from torch.utils.data import DataLoader

import create_input_files
import eval as evaluate_script
import make_shapes_dataset
import train
import checkpoints
from conftest import cores_per_test_process
from datasets import CaptionDataset

SMALL_MODEL = ["--encoder-arch", "resnet18", "--encoder-cut-after", "layer2", "--encoded-size", "8",
               "--no-pretrained", "--fine-tune-encoder", "--attention-dim", "128", "--embed-dim", "64",
               "--decoder-dim", "128", "--dropout", "0.1", "--workers", "0", "--batch-size", "32",
               "--encoder-lr", "1e-3", "--decoder-lr", "2e-3", "--lr-decay-patience", "1",
               "--lr-decay-factor", "0.5", "--log-images", "0"]  # no attention figures: they train nothing


@pytest.fixture
def all_cores():
    """This test runs alone in its process: let it use the cores its process has (conftest sets one
    thread; under pytest-xdist the cores are shared among its processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cores_per_test_process())
    yield
    torch.set_num_threads(threads)


SEED = 11


@pytest.fixture(scope="module")
def shapes_1000(tmp_path_factory):
    """1000 shapes images packed at 64x64: the data both short trainings learn from."""
    raw, data = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("data")
    make_shapes_dataset.main(["--output-folder", str(raw), "--num-images", "1000", "--seed", str(SEED)])
    create_input_files.main(["--dataset", "shapes", "--karpathy-json", str(raw / "dataset_shapes.json"),
                             "--image-folder", str(raw), "--output-folder", str(data), "--image-size", "64",
                             "--workers", "0"])
    return data


def test_short_training_learns_words_and_content(shapes_1000, tmp_path, all_cores):
    data, run = shapes_1000, tmp_path / "run"
    train.main(["--data-folder", str(data), "--output-dir", str(run), "--epochs", "3", "--seed", str(SEED),
                *SMALL_MODEL])

    device = torch.device("cpu")
    encoder, decoder, state = checkpoints.models_from_checkpoint(run / "best.pt", device)
    word_map = state["word_map"]
    test_set = CaptionDataset(data, "test")
    metrics, _ = train.validate(encoder, decoder, DataLoader(test_set, batch_size=32), word_map, device,
                                "none", alpha_c=0.0, beam_size=1, max_steps=20, world_size=1)
    uniform = math.log(len(word_map))
    assert metrics["val_tf_loss"] < 0.4 * uniform, (metrics, uniform)

    scores, _ = evaluate_script.evaluate(encoder, decoder, word_map, data, "test", beam_size=3, max_steps=20,
                                         batch_size=32, device=device, coco_metrics=False, show_progress=False)
    # About a minute of training leaves the model at the edge of naming objects: over 6 runs (seeds
    # 11 and 12, batch 16 and 32, two float-rounding variants) the weakest still beat the baseline by
    # 0.10 in content accuracy and 0.09 in BLEU-4; an untrained model scores at or below the baseline.
    # Seed 12 was one of those runs; the suite trains seed 11 alone, as each training is two minutes of CI.
    assert (scores["content_accuracy"] > scores["baseline_content_accuracy"] + 0.07
            or scores["bleu4"] > scores["baseline_bleu4"] + 0.05), scores


def test_short_hard_attention_training_beats_the_content_free_baseline(shapes_1000, tmp_path, all_cores):
    data, run = shapes_1000, tmp_path / "run"
    train.main(["--data-folder", str(data), "--output-dir", str(run), "--epochs", "3", "--seed", str(SEED),
                "--attention", "hard", *SMALL_MODEL])
    scores = evaluate_script.main(["--checkpoint", str(run / "best.pt"), "--data-folder", str(data), "--split",
                                   "test", "--beam-size", "3", "--max-steps", "20", "--workers", "0",
                                   "--no-coco-metrics"])
    assert scores["attention"] == "hard" and scores["hard_read"] == "argmax"
    # Reading one cell per word, it still names what is in the image better than captions of other images.
    assert (scores["content_accuracy"] > scores["baseline_content_accuracy"]
            and scores["bleu4"] > scores["baseline_bleu4"]), scores
