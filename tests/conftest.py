"""Shared fixtures: a tiny shapes dataset, packed, and a tiny model trained on it (once per session)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Two cores in CI: one intra-op thread per test process keeps torchrun ranks and workers from fighting.
torch.set_num_threads(1)

# A small, fast model: ResNet-18 cut after layer2 on 64x64 images gives an 8x8 attention grid.
TINY_MODEL = ["--encoder-arch", "resnet18", "--encoder-cut-after", "layer2", "--encoded-size", "8",
              "--no-pretrained", "--fine-tune-encoder", "--attention-dim", "32", "--embed-dim", "16",
              "--decoder-dim", "32", "--workers", "0", "--batch-size", "16"]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the decoding tests run their models (cpu, cuda): `pytest tests/test_decoding.py "
                          "--device cuda` checks the CUDA path on a GPU machine")


@pytest.fixture(scope="session")
def device(request):
    """The torch.device of --device (default cpu)."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda, but torch sees no CUDA device")
    return device


@pytest.fixture(scope="session")
def shapes_raw(tmp_path_factory):
    """Folder with 120 generated shapes images and their Karpathy-format JSON."""
    import make_shapes_dataset

    folder = tmp_path_factory.mktemp("shapes_raw")
    make_shapes_dataset.main(["--output-folder", str(folder), "--num-images", "120", "--seed", "3"])
    return folder


@pytest.fixture(scope="session")
def packed_data(shapes_raw, tmp_path_factory):
    """The tiny shapes set packed at 64x64 by create_input_files.py."""
    import create_input_files

    out = tmp_path_factory.mktemp("packed")
    create_input_files.main(["--dataset", "shapes", "--karpathy-json", str(shapes_raw / "dataset_shapes.json"),
                             "--image-folder", str(shapes_raw), "--output-folder", str(out),
                             "--image-size", "64", "--workers", "0", "--min-word-freq", "1"])
    return out


@pytest.fixture(scope="session")
def trained_run(packed_data, tmp_path_factory):
    """Output folder of a 2-epoch tiny training run on packed_data (last.pt, best.pt, metrics.csv)."""
    import train

    out = tmp_path_factory.mktemp("run")
    train.main(["--data-folder", str(packed_data), "--output-dir", str(out), "--epochs", "2",
                "--decoder-lr", "3e-3", "--encoder-lr", "1e-3", *TINY_MODEL])
    return out
