"""What a new user trips over: where caption.py's figures go, object boxes found from any folder,
split sizes that cannot be met, a resumed run with nothing left, devices that are not there, and
the figures written to metrics.csv. Each test is one rough edge and its fix."""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import caption
import create_input_files
import eval as evaluate_script
import train
from conftest import pack_args, write_karpathy
from metrics import bleu_scores
from test_robustness import (ENV, REPO, assert_one_line_error, data, one_epoch, raw, run_script,  # noqa: F401
                             solid, train_argv)


# ----------------------------------------------------------------------------------------------
# caption.py: where figures go


def caption_argv(img, checkpoint, *extra):
    return ["--img", img, "--checkpoint", checkpoint, "--beam-size", "2", *extra]


def test_out_that_is_a_folder_gets_the_figure_inside_and_nothing_beside_it(one_epoch, raw, tmp_path, monkeypatch):
    image = next((raw / "images").iterdir())
    figures = tmp_path / "figures"
    figures.mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_script(caption, caption_argv(image, one_epoch / "last.pt", "--out", figures), "caption.py") is None
    made = figures / f"{image.stem}_{image.suffix[1:]}_attention.png"
    assert made.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"]  # no temporary file left anywhere
    assert [p.name for p in figures.iterdir()] == [made.name]
    # A name without a figure extension is a folder too, made when missing.
    assert run_script(caption, caption_argv(image, one_epoch / "last.pt", "--out", "more"), "caption.py") is None
    assert (tmp_path / "more" / made.name).is_file()


@pytest.mark.parametrize("name, magic", [("x.jpg", b"\xff\xd8\xff"), ("x.JPEG", b"\xff\xd8\xff"),
                                         ("x.png", b"\x89PNG"), ("x.pdf", b"%PDF"), ("x.svg", b"<?xml")])
def test_out_file_gets_the_format_its_extension_names(one_epoch, raw, tmp_path, name, magic):
    image = next((raw / "images").iterdir())
    assert run_script(caption, caption_argv(image, one_epoch / "last.pt", "--out", tmp_path / name),
                      "caption.py") is None
    assert (tmp_path / name).read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_out_refusals_name_the_file_and_the_rule(one_epoch, raw, tmp_path):
    image = next((raw / "images").iterdir())
    (tmp_path / "taken").write_text("a file, not a folder")
    message = run_script(caption, caption_argv(image, one_epoch / "last.pt", "--out", tmp_path / "taken"),
                         "caption.py")
    assert_one_line_error(message, "caption.py", tmp_path / "taken", "not a folder", ".png")
    message = run_script(caption, caption_argv(raw / "images", one_epoch / "last.pt", "--out", tmp_path / "f.png"),
                         "caption.py")
    assert_one_line_error(message, "caption.py", tmp_path / "f.png", "folder")
    message = run_script(caption, caption_argv(image, one_epoch / "last.pt", "--out", tmp_path / "f.gif"),
                         "caption.py")
    assert_one_line_error(message, "caption.py", tmp_path / "f.gif", ".png, .jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_folder_with_same_stem_files_and_a_bad_one_gets_every_good_figure_and_fails_at_the_end(
        one_epoch, tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(photos / "photo.tif")
    Image.new("RGB", (40, 40), (0, 0, 200)).save(photos / "photo.webp")
    (photos / "broken.jpg").write_text("not an image")
    Image.new("RGB", (40, 40), (0, 200, 0)).save(photos / "zebra.png")
    message = run_script(caption, caption_argv(photos, one_epoch / "last.pt", "--out", tmp_path / "figs"),
                         "caption.py")
    assert_one_line_error(message, "caption.py", "1 of 4 images", photos)
    captured = capsys.readouterr()
    assert f"skipped: {photos / 'broken.jpg'}: cannot decode image" in captured.err
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "photo_tif_attention.png", "photo_webp_attention.png", "zebra_png_attention.png"]
    assert captured.out.count(": ") >= 3  # every good image's caption was printed


def test_boxes_are_found_from_another_folder_and_after_the_dataset_moved(one_epoch, raw, data, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(caption, "attention_figure", lambda pixels, words, alphas, grid, out, objects, *rest, **options:
                        drawn.append(objects))
    meta = json.loads((data / "train_meta.json").read_text())["images"][0]
    assert Path(meta["file"]).is_absolute() and meta["objects"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = Path(meta["file"])
    moved = tmp_path / "copy" / meta["name"]
    moved.parent.mkdir(parents=True)
    moved.write_bytes(image.read_bytes())
    for img in (image, Path("..") / "copy" / meta["name"]):
        run_script(caption, caption_argv(img, one_epoch / "last.pt", "--data-folder", data, "--out", "f.png"),
                   "caption.py")
    assert drawn == [meta["objects"], meta["objects"]]


def test_images_the_data_folder_does_not_hold_get_one_summary_note_instead_of_silently_no_boxes(
        one_epoch, data, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("stranger.png", "other.png"):
        solid(photos / name)
    assert run_script(caption, caption_argv(photos, one_epoch / "last.pt", "--data-folder", data,
                                            "--out", tmp_path / "figures"), "caption.py") is None
    err = capsys.readouterr().err
    assert err.count("not among the images packed") == 1
    assert f"note: 2 of 2 images are not among the images packed in {data}" in err


# ----------------------------------------------------------------------------------------------
# Splits that cannot be filled, and eval.py on an empty one


def test_coco_split_sizes_larger_than_val2014_are_refused_before_any_image_is_read(tmp_path):
    annotations = {"images": [{"id": i, "file_name": f"v{i}.jpg", "width": 8, "height": 8} for i in range(5)],
                   "annotations": [{"id": i, "image_id": i, "caption": "a thing"} for i in range(5)]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(annotations))
    argv = ["--coco-annotations", path, "--image-folder", tmp_path, "--output-folder", tmp_path / "out",
            "--val-size", 3, "--test-size", 3, "--workers", 0]
    message = run_script(create_input_files, argv, "create_input_files.py")
    assert_one_line_error(message, "create_input_files.py", path, "holds 5 images", "--val-size 3",
                          "--test-size 3")
    assert not (tmp_path / "out" / ".train.h5.partial").exists()


def test_eval_refuses_an_empty_split_in_one_sentence(tmp_path):
    for i in range(3):
        solid(tmp_path / f"im{i}.png", colour=(i * 60, 0, 0))
    entries = [("im0.png", "train", ["a red box"]), ("im1.png", "train", ["a dark box"]),
               ("im2.png", "val", ["a red box"])]
    data_folder = tmp_path / "data"
    create_input_files.main(pack_args(write_karpathy(tmp_path, entries), tmp_path, data_folder))
    run = tmp_path / "run"
    train.main(train_argv(data_folder, run, batch=2))
    message = run_script(evaluate_script, ["--checkpoint", run / "last.pt", "--data-folder", data_folder,
                                           "--workers", 0, "--no-coco-metrics"], "eval.py")
    assert_one_line_error(message, "eval.py", data_folder, "test split has no images")


def test_a_failed_packing_run_leaves_no_partial_files(tmp_path):
    solid(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("no image")
    argv = pack_args(write_karpathy(tmp_path, [("ok.png", "train", ["a box"]), ("bad.png", "val", ["a box"])]),
                     tmp_path, tmp_path / "out")
    message = run_script(create_input_files, argv, "create_input_files.py")
    assert_one_line_error(message, "create_input_files.py", tmp_path / "bad.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Training: nothing left to train, devices that are not there, --amp on the CPU


def test_resuming_a_finished_run_says_nothing_is_left_and_how_to_train_further(data, one_epoch, tmp_path, capsys):
    history = train.main(train_argv(data, tmp_path / "again", "--resume", one_epoch / "last.pt", epochs=1))
    err = capsys.readouterr().err
    assert "nothing left to train" in err and "has finished 1 epochs and --epochs is 1" in err
    assert "pass a larger --epochs" in err and len(history) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("flag", ["cuda", "gpu", "cuda:1"])
def test_a_device_that_is_not_there_is_one_sentence_in_every_script(flag, data, one_epoch, raw, tmp_path):
    image = next((raw / "images").iterdir())
    runs = {"train.py": (train, train_argv(data, tmp_path / "r") + ["--device", flag]),
            "eval.py": (evaluate_script, ["--checkpoint", one_epoch / "last.pt", "--data-folder", data,
                                          "--device", flag]),
            "caption.py": (caption, ["--img", image, "--checkpoint", one_epoch / "last.pt", "--device", flag])}
    for prog, (module, argv) in runs.items():
        message = run_script(module, argv, prog)
        assert_one_line_error(message, prog, f"--device {flag}", "this machine has: cpu")


@pytest.mark.parametrize("model", [[], ["--attention", "hard", "--output-layer", "deep"]], ids=["soft", "hard-deep"])
def test_amp_on_the_cpu_says_it_runs_under_cpu_autocast(data, tmp_path, capsys, model):
    history = train.main(train_argv(data, tmp_path / "run", "--amp", "bf16", *model))
    assert history and all(math.isfinite(row["train_loss"]) for row in history)
    assert "note: --amp bf16 on cpu: torch's CPU autocast runs it" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Figures and help texts


def test_bleu_with_no_matching_4gram_is_written_as_zero_not_an_underflow(data, tmp_path, monkeypatch):
    scores = bleu_scores([[["a", "red", "circle", "on", "blue"]]], [["a", "red", "circle", "x"]])
    assert scores["bleu4"] == 0.0 and scores["bleu3"] > 0.4
    monkeypatch.setattr(train, "bleu_scores", lambda refs, hyps: bleu_scores([[["zz", "yy"]]] * len(hyps), hyps))
    train.main(train_argv(data, tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert next(csv.DictReader(f))["val_decoded_bleu4"] == "0.0"


HELP_SCRIPTS = ["create_input_files.py", "caption.py", "train.py", "eval.py", "bench.py", "make_shapes_dataset.py",
                "bench_tutorial_pack.py"]
# Runs each script named on its command line as `python SCRIPT --help` does (as __main__, with that argv),
# and prints {script: [exit code, stdout]}: one interpreter start and one torch import for all of them.
RUN_EACH_WITH_HELP = """
import contextlib, io, json, runpy, sys
outputs = {}
for script in sys.argv[1:]:
    sys.argv, stdout, code = [script, "--help"], io.StringIO(), 0
    with contextlib.redirect_stdout(stdout):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code or 0
    outputs[script] = [code, stdout.getvalue()]
print(json.dumps(outputs))
"""


@pytest.fixture(scope="module")
def help_outputs():
    """{script: [exit code, what `python script --help` prints]} for every script of HELP_SCRIPTS."""
    result = subprocess.run([sys.executable, "-c", RUN_EACH_WITH_HELP, *HELP_SCRIPTS], cwd=REPO,
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", HELP_SCRIPTS)
def test_help_examples_keep_their_line_continuations(script, help_outputs):
    returncode, stdout = help_outputs[script]
    assert returncode == 0
    source = (REPO / script).read_text()
    continued = source.count(" \\\n        --") if source.lstrip().startswith('r"""') else 0
    assert stdout.count(" \\\n        --") == continued
    assert not re.search(r"\S {4,}--[a-z]", stdout.split("options:")[0])  # no collapsed example
    assert not re.search(r"\b[Ii]ssue \d", stdout)
