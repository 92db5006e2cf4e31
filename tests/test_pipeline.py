"""The real scripts end to end on a tiny shapes set: pack -> train 2 epochs -> resume a 3rd -> eval -> caption."""
import argparse
import csv
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

import caption
import train
from conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


def test_packed_files_are_consistent(packed_data):
    manifest = json.loads((packed_data / "manifest.json").read_text())
    word_map = json.loads((packed_data / "word_map.json").read_text())
    assert manifest["vocab_size"] == len(word_map) and word_map["<pad>"] == 0
    for split in ("train", "val", "test"):
        with h5py.File(packed_data / f"{split}.h5", "r") as f:
            n = manifest["images"][split]
            assert f["images"].shape == (n, 3, 64, 64) and f["images"].dtype == "uint8"
            assert f["captions"].shape == (n * 5, manifest["max_len"] + 2)
            captions, lengths = f["captions"][:], f["lengths"][:]
        assert (captions[:, 0] == word_map["<start>"]).all()
        assert all(row[n - 1] == word_map["<end>"] and (row[n:] == 0).all() for row, n in zip(captions, lengths))
        meta = json.loads((packed_data / f"{split}_meta.json").read_text())["images"]
        assert len(meta) == n and all(0 <= v <= 1 for m in meta for o in m["objects"] for v in o["bbox"])


def test_train_resume_eval_caption(packed_data, trained_run, tmp_path, shapes_raw):
    history = list(csv.DictReader(open(trained_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert {"val_tf_loss", "val_tf_top5", "val_decoded_bleu4"} <= history[0].keys()

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["samples_done"] == 0
    train.main(["--data-folder", str(packed_data), "--output-dir", str(run), "--epochs", "3",
                "--resume", str(run / "last.pt"), "--decoder-lr", "3e-3", "--encoder-lr", "1e-3", *TINY_MODEL])
    history = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in history] == [0, 1, 2]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3

    # eval.py and caption.py through their command lines, as a user runs them; side by side, since most
    # of each run is its interpreter's start and imports.
    out, figure = tmp_path / "eval", tmp_path / "figure.png"
    image = sorted((shapes_raw / "images").glob("*.jpg"))[0]
    commands = [["eval.py", "--checkpoint", str(run / "best.pt"), "--data-folder", str(packed_data),
                 "--beam-size", "3", "--output-dir", str(out), "--workers", "0", "--no-coco-metrics"],
                ["caption.py", "--img", str(image), "--checkpoint", str(run / "best.pt"), "--data-folder",
                 str(packed_data), "--out", str(figure)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core each
    processes = [subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for command in commands]
    (_, eval_stderr), (caption_stdout, caption_stderr) = (process.communicate(timeout=300) for process in processes)
    assert processes[0].returncode == 0, eval_stderr
    metrics = json.loads((out / "metrics_test_beam3.json").read_text())
    assert 0.0 <= metrics["bleu4"] <= 1.0 and "content_accuracy" in metrics and "baseline_bleu4" in metrics
    captions = json.loads((out / "captions_test_beam3.json").read_text())
    assert len(captions) == metrics["images"] and all({"image_id", "caption"} == c.keys() for c in captions)

    assert processes[1].returncode == 0, caption_stderr
    assert str(image) in caption_stdout and figure.stat().st_size > 1000
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_caption_accepts_any_image_mode(trained_run, tmp_path):
    from PIL import Image

    for mode in ("L", "RGBA", "P", "CMYK"):
        Image.new(mode, (50, 30)).save(tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    results = caption.main(["--img", str(tmp_path), "--checkpoint", str(trained_run / "last.pt"),
                            "--beam-size", "2", "--out", str(tmp_path / "figs")])
    assert len(results) == 4 and all(isinstance(words, list) for _, words in results)
    assert len(list((tmp_path / "figs").glob("*_attention.png"))) == 4


@pytest.mark.parametrize("module", ["make_shapes_dataset", "create_input_files", "train", "eval", "caption", "app",
                                    "bench_app", "bench_tutorial_pack", "scst", "cider"])
def test_every_flag_has_a_help_string(module, monkeypatch):
    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([])
    actions = [a for a in parsers[0]._actions if a.dest != "help"]
    assert actions
    for action in actions:
        assert action.help and len(action.help) > 10, f"{module}: {action.option_strings} has no help"
        assert all(s.startswith("--") and "_" not in s for s in action.option_strings)


def test_help_runs_from_the_command_line():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "--data-folder" in result.stdout and "per process" in result.stdout
