"""Shared fixtures: a tiny shapes dataset, packed, and a tiny model trained on it (once per session);
and helpers for small datasets written by the tests themselves."""
import json
import os
import sys
from pathlib import Path

import h5py

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Two cores in CI: one intra-op thread per test process keeps torchrun ranks and workers from fighting.
torch.set_num_threads(1)

# A small, fast model: ResNet-18 cut after layer2 on 64x64 images gives an 8x8 attention grid.
TINY_MODEL = ["--encoder-arch", "resnet18", "--encoder-cut-after", "layer2", "--encoded-size", "8",
              "--no-pretrained", "--fine-tune-encoder", "--attention-dim", "32", "--embed-dim", "16",
              "--decoder-dim", "32", "--workers", "0", "--batch-size", "16",
              "--log-images", "0"]  # attention figures cost ~0.5 s each: tests/test_watching.py asks for them


# Under pytest-xdist (make test) each process takes whole files as it frees up: the longest start first,
# so that none of them is left running alone at the end.
LONGEST_FILES = ("test_quality.py", "test_distributed.py", "test_scst.py", "test_robustness.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES
               else len(LONGEST_FILES))  # sort is stable: each file's tests keep their order


def cores_per_test_process():
    """This machine's cores shared among pytest-xdist's processes (one when the suite runs in one)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "page: serves the web page (needs Gradio): `make test-app` runs these")


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


# ----------------------------------------------------------------------------------------------
# Small datasets the tests write, and reading what was packed


def write_karpathy(folder, entries):
    """Karpathy-format JSON for `entries` [(filename, split, [raw captions])] in `folder`."""
    images = [{"filepath": "", "filename": name, "imgid": i, "split": split,
               "sentences": [{"raw": c} for c in captions]}
              for i, (name, split, captions) in enumerate(entries)]
    path = Path(folder) / "dataset.json"
    path.write_text(json.dumps({"images": images}, ensure_ascii=False), encoding="utf-8")
    return path


def pack_args(json_path, image_folder, out, *extra, size=32):
    """create_input_files.py arguments for a small custom dataset."""
    argv = ["--dataset", "coco", "--karpathy-json", json_path, "--image-folder", image_folder,
            "--output-folder", out, "--image-size", size, "--workers", 0, "--min-word-freq", 1, *extra]
    return [str(a) for a in argv]


def packed_captions(data_folder, split):
    """A packed split's captions read straight from its files: word lists grouped per image (in
    order), and the word map. Each row must be <start> words <end> <pad>..., so that row[1:length - 1]
    is all of its words."""
    word_map = json.loads((Path(data_folder) / "word_map.json").read_text())
    words = {i: w for w, i in word_map.items()}
    with h5py.File(Path(data_folder) / f"{split}.h5") as f:
        per_image = int(f.attrs["captions_per_image"])
        rows, lengths = f["captions"][:], f["lengths"][:]
    assert all(row[0] == word_map["<start>"] and row[n - 1] == word_map["<end>"] for row, n in zip(rows, lengths))
    captions = [[words[t] for t in row[1:n - 1]] for row, n in zip(rows, lengths)]
    return [captions[i:i + per_image] for i in range(0, len(captions), per_image)], word_map
