"""Bad inputs and interrupted runs: nothing lost, nothing half-written, one clear line per error.

Subprocesses only where the behaviour is about the process (exit codes, signals, stderr); elsewhere
the scripts' main() runs in this process under utils.run_main, exactly as their __main__ blocks do.
"""
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import caption
import checkpoints
import create_input_files
import eval as evaluate_script
import make_shapes_dataset
import models
import train
import utils
from conftest import pack_args, write_karpathy
from datasets import CaptionDataset

REPO = Path(__file__).resolve().parents[1]
# ResNet-18 cut after layer2 on 32x32 images: a 4x4 grid. Small enough for ~20 steps a second on one core;
# on the CPU even where a GPU is present, so that runs in and out of this process match bit for bit.
TINY32 = ["--encoder-arch", "resnet18", "--encoder-cut-after", "layer2", "--encoded-size", "4",
          "--no-pretrained", "--fine-tune-encoder", "--attention-dim", "32", "--embed-dim", "16",
          "--decoder-dim", "32", "--workers", "0", "--device", "cpu",
          "--log-images", "0"]  # attention figures cost ~0.5 s each: tests/test_watching.py checks them
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# Helpers


def run_script(module, argv, prog):
    """main(argv) under utils.run_main, as `python prog.py argv` runs it.

    Returns the exit message (a str, which Python prints to stderr with exit code 1) or None on success.
    Any other exception propagates and fails the test: that would be a traceback for the user.
    """
    try:
        utils.run_main(lambda: module.main([str(a) for a in argv]), prog)
    except SystemExit as exc:
        assert isinstance(exc.code, str), f"exit code {exc.code!r} instead of a message"
        return exc.code
    return None


def assert_one_line_error(message, prog, *names):
    """A `prog: error: ...` line that names every one of `names`."""
    assert message is not None, "expected an error, the run succeeded"
    assert message.startswith(f"{prog}: error: ") and "\n" not in message, message
    for name in names:
        assert str(name) in message, f"{name} not named in: {message}"


def run_subprocess(script, *args, env=None, timeout=120):
    """Run a repository script; returns the CompletedProcess with text output."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def assert_process_error(result, *names):
    """Non-zero exit, no traceback, and the last stderr line names every one of `names`."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert ": error: " in last, result.stderr
    for name in names:
        assert str(name) in last, f"{name} not named in: {last}"


def solid(path, colour=(10, 200, 30), size=(20, 12)):
    """Save a solid-colour RGB image; returns its path."""
    Image.new("RGB", size, colour).save(path)
    return path


def weights(path):
    """Encoder and decoder tensors of a checkpoint, by name."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {**{f"encoder.{k}": v for k, v in state["encoder"].items()},
            **{f"decoder.{k}": v for k, v in state["decoder"].items()}}


def assert_same_weights(path_a, path_b):
    a, b = weights(path_a), weights(path_b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def wait_for(predicate, process, timeout=60.0):
    """Poll `predicate` every few ms until it holds; fail if `process` ends first."""
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"process ended (code {process.returncode}) before the condition held: "
                                 + process.stderr.read().decode()[-2000:])
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.002)


# ----------------------------------------------------------------------------------------------
# Shared tiny data


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """40 shapes images (64x64 JPEGs) and their Karpathy JSON: 32 train, 4 val, 4 test."""
    folder = tmp_path_factory.mktemp("raw")
    make_shapes_dataset.main(["--output-folder", str(folder), "--num-images", "40", "--seed", "1",
                              "--image-size", "64"])
    return folder


@pytest.fixture(scope="module")
def data(raw, tmp_path_factory):
    """`raw` packed at 32x32."""
    out = tmp_path_factory.mktemp("data")
    create_input_files.main(pack_args(raw / "dataset_shapes.json", raw, out) + ["--dataset", "shapes"])
    return out


HARD_DEEP = ["--attention", "hard", "--output-layer", "deep"]  # the model options beside the defaults


def train_argv(data, out, *extra, epochs=1, batch=16):
    argv = ["--data-folder", data, "--output-dir", out, "--epochs", epochs, "--batch-size", batch,
            "--decoder-lr", "3e-3", "--encoder-lr", "1e-3", *TINY32, *extra]
    return [str(a) for a in argv]


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory):
    """A finished 1-epoch run on `data` (batch 16): its last.pt is an epoch-end checkpoint."""
    out = tmp_path_factory.mktemp("one_epoch")
    train.main(train_argv(data, out))
    return out


# ----------------------------------------------------------------------------------------------
# Packing: bad image files


def bad_files(folder):
    """{kind: path} of one missing, one empty, one truncated and one not-an-image file."""
    folder = Path(folder)
    good = folder / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(good)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (folder / "text.jpg").write_text("not an image at all\n")
    return {"missing": folder / "missing.jpg", "empty": folder / "empty.jpg",
            "truncated": folder / "truncated.jpg", "not_an_image": folder / "text.jpg"}


def test_packing_a_copy_of_the_dataset_elsewhere_gives_the_same_captions(tmp_path):
    # More captions than --captions-per-image: which ones are kept is drawn per image, and must not
    # depend on where the dataset lies on disk.
    for folder in ("a", "b/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        entries = []
        for i in range(6):
            solid(tmp_path / folder / f"img{i}.png", colour=(i * 40, 0, 0))
            entries.append((f"img{i}.png", "train", [f"caption {i} number {k}" for k in range(7)]))
        create_input_files.main(pack_args(write_karpathy(tmp_path / folder, entries), tmp_path / folder,
                                          tmp_path / folder / "out", "--captions-per-image", "2"))
    with h5py.File(tmp_path / "a" / "out" / "train.h5") as a, h5py.File(tmp_path / "b/deeper/out/train.h5") as b:
        assert np.array_equal(a["captions"][:], b["captions"][:])
        assert np.array_equal(a["images"][:], b["images"][:])


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not_an_image"])
def test_bad_image_stops_packing_with_one_line_naming_it(tmp_path, kind):
    bad = bad_files(tmp_path)[kind]
    solid(tmp_path / "ok.png")
    json_path = write_karpathy(tmp_path, [("ok.png", "train", ["a green box"]),
                                          (bad.name, "train", ["a bad file"])])
    message = run_script(create_input_files, pack_args(json_path, tmp_path, tmp_path / "out"),
                         "create_input_files.py")
    assert_one_line_error(message, "create_input_files.py", bad, "--skip-bad-images")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_image_error_from_the_command_line(tmp_path):
    bad = bad_files(tmp_path)["truncated"]
    for i in range(20):
        solid(tmp_path / f"ok{i}.png")
    entries = [(f"ok{i}.png", "train", ["a green box"]) for i in range(20)] + [(bad.name, "train", ["bad"])]
    # Decoding in worker processes: the error still comes back as one line from the main process.
    argv = pack_args(write_karpathy(tmp_path, entries), tmp_path, tmp_path / "out", "--workers", "2")
    result = run_subprocess("create_input_files.py", *argv)
    assert_process_error(result, bad)
    assert result.returncode == 1 and not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_images_drops_them_and_their_captions_and_lists_them(tmp_path, capsys):
    bad = bad_files(tmp_path)
    entries = [(f"ok{i}.png", "train", [f"good caption {i}", "shared words"]) for i in range(3)]
    entries += [(path.name, "train", [f"caption of {kind} zzz{kind}"]) for kind, path in bad.items()]
    for i in range(3):
        solid(tmp_path / f"ok{i}.png", colour=(i * 50, 0, 0))
    out = tmp_path / "out"
    manifest = create_input_files.main(pack_args(write_karpathy(tmp_path, entries), tmp_path, out,
                                                 "--skip-bad-images", "--captions-per-image", "2"))
    stdout = capsys.readouterr().out
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["images"]["train"] == 3 and on_disk["dropped"]["bad_images"] == 4
    assert sorted(b["file"] for b in on_disk["bad_images"]) == sorted(str(p) for p in bad.values())
    reasons = {Path(b["file"]).name: b["reason"] for b in on_disk["bad_images"]}
    assert "truncated" in reasons[bad["truncated"].name].lower() and reasons["missing.jpg"] == "no such image file"
    assert "4 bad images" in stdout
    assert all(f"{p} ({reasons[p.name]})" in stdout for p in bad.values())
    # Their captions are gone: no word only they used reaches the word map or the caption file.
    word_map = json.loads((out / "word_map.json").read_text())
    assert not [w for w in word_map if w.startswith("zzz")]
    with h5py.File(out / "train.h5") as f:
        assert f["images"].shape == (3, 3, 32, 32) and f["captions"].shape[0] == 3 * 2
        assert [list(f["images"][i][:, 0, 0]) for i in range(3)] == [[0, 0, 0], [50, 0, 0], [100, 0, 0]]
    meta = json.loads((out / "train_meta.json").read_text())["images"]
    assert [Path(m["file"]).name for m in meta] == ["ok0.png", "ok1.png", "ok2.png"]


# ----------------------------------------------------------------------------------------------
# Packing: image modes, EXIF orientation


def mode_images(folder):
    """{file name: expected RGB colour} for one solid image per awkward mode."""
    folder = Path(folder)
    expected = {}
    Image.new("L", (30, 20), 100).save(folder / "l.png")
    expected["l.png"] = (100, 100, 100)
    Image.new("LA", (30, 20), (60, 255)).save(folder / "la_opaque.png")
    expected["la_opaque.png"] = (60, 60, 60)
    Image.new("LA", (30, 20), (60, 0)).save(folder / "la_clear.png")  # transparent: white background
    expected["la_clear.png"] = (255, 255, 255)
    palette = Image.new("P", (30, 20), 2)
    palette.putpalette([0, 0, 0, 9, 9, 9, 200, 40, 70] + [0] * (256 * 3 - 9))
    palette.save(folder / "p.png")
    expected["p.png"] = (200, 40, 70)
    palette.save(folder / "p.gif")
    expected["p.gif"] = (200, 40, 70)
    Image.new("RGBA", (30, 20), (0, 0, 255, 255)).save(folder / "rgba_opaque.png")
    expected["rgba_opaque.png"] = (0, 0, 255)
    Image.new("RGBA", (30, 20), (255, 0, 0, 128)).save(folder / "rgba_half.png")  # half red over white
    expected["rgba_half.png"] = (255, 127, 127)
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "cmyk.tif")  # pure red in CMYK
    expected["cmyk.tif"] = (255, 0, 0)
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = (255, 0, 0)
    sixteen = Image.fromarray(np.full((20, 30), 32896, dtype=np.uint16))  # 16-bit grey, 0x8080
    assert sixteen.mode in ("I;16", "I")
    sixteen.save(folder / "i16.png")
    with Image.open(folder / "i16.png") as check:
        assert check.mode in ("I;16", "I")  # what a 16-bit greyscale PNG opens as
    expected["i16.png"] = (128, 128, 128)
    return expected


def exif_rotated_jpeg(path):
    """A JPEG stored sideways (left half red, right half blue, 40x20) with EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display": upright, the image is 20 wide
    and 40 tall, red on top and blue below.
    """
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # (H, W, 3)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return path


def test_every_image_mode_packs_to_the_right_pixels(tmp_path):
    expected = mode_images(tmp_path)
    exif_rotated_jpeg(tmp_path / "exif6.jpg")
    names = sorted(expected) + ["exif6.jpg"]
    json_path = write_karpathy(tmp_path, [(n, "train", [f"image {n}"]) for n in names])
    out = tmp_path / "out"
    create_input_files.main(pack_args(json_path, tmp_path, out))
    with h5py.File(out / "train.h5") as f:
        images = f["images"][:]  # (N, 3, 32, 32) in the order of the JSON
    for name, pixels in zip(names, images):
        if name == "exif6.jpg":
            continue
        mean = pixels.reshape(3, -1).mean(axis=1)
        tolerance = 6 if name.endswith(".jpg") else 1
        assert np.abs(mean - np.array(expected[name])).max() <= tolerance, (name, mean)
    rotated = images[names.index("exif6.jpg")].astype(int)  # (3, S, S)
    top, bottom = rotated[:, :12].reshape(3, -1).mean(axis=1), rotated[:, -12:].reshape(3, -1).mean(axis=1)
    assert top[0] > 200 and top[2] < 50, f"top of the upright image should be red, is {top}"
    assert bottom[2] > 200 and bottom[0] < 50, f"bottom of the upright image should be blue, is {bottom}"
    left, right = rotated[:, :, :12].reshape(3, -1).mean(axis=1), rotated[:, :, -12:].reshape(3, -1).mean(axis=1)
    assert np.abs(left - right).max() < 10  # no left/right split: it was rotated, not left as stored


# ----------------------------------------------------------------------------------------------
# Packing: captions


def test_tokenize_keeps_non_ascii_words_and_splits_cjk_into_characters():
    tokenize = create_input_files.tokenize
    assert tokenize("Un café TRÈS bon!") == ["un", "café", "très", "bon"]
    assert tokenize("Don't  stop, naïve Zoë…") == ["don't", "stop", "naïve", "zoë"]
    # Chinese and Japanese have no spaces: each ideograph or kana is one word.
    assert tokenize("一只猫。") == ["一", "只", "猫"]
    assert tokenize("a 黑色的猫 on 2 mats") == ["a", "黑", "色", "的", "猫", "on", "2", "mats"]
    assert tokenize("ねこがいる") == ["ね", "こ", "が", "い", "る"]
    assert tokenize("고양이 한 마리") == ["고양이", "한", "마리"]  # Korean is spaced: words stay whole
    assert tokenize("...!!! -- ?") == [] and tokenize("") == [] and tokenize("   ") == []


def test_empty_and_punctuation_captions_are_dropped_and_non_ascii_kept(tmp_path, capsys):
    for i in range(4):
        solid(tmp_path / f"im{i}.png", colour=(i * 60, 0, 0))
    entries = [
        ("im0.png", "train", ["a red square", "", "...!!!"]),
        ("im1.png", "train", ["un café très bon", " -- ? "]),
        ("im2.png", "train", ["一只猫"]),
        ("im3.png", "train", ["", "!!", "。"]),  # no usable caption: the image is dropped
    ]
    out = tmp_path / "out"
    manifest = create_input_files.main(pack_args(write_karpathy(tmp_path, entries), tmp_path, out,
                                                 "--captions-per-image", "1"))
    stdout = capsys.readouterr().out
    assert manifest["dropped"]["empty_captions"] == 6 and manifest["dropped"]["images_without_captions"] == 1
    assert "6 empty captions" in stdout and "1 images without captions" in stdout
    assert manifest["images"]["train"] == 3
    word_map = json.loads((out / "word_map.json").read_text(encoding="utf-8"))
    assert {"café", "très", "一", "只", "猫"} <= word_map.keys()
    rev = {v: k for k, v in word_map.items()}
    with h5py.File(out / "train.h5") as f:
        captions, lengths = f["captions"][:], f["lengths"][:]
        first_pixels = f["images"][:, 0, 0, 0]
    decoded = [[rev[t] for t in row[1:n - 1]] for row, n in zip(captions, lengths)]
    assert decoded == [["a", "red", "square"], ["un", "café", "très", "bon"], ["一", "只", "猫"]]
    assert list(first_pixels) == [0, 60, 120]  # im3 is not there
    meta = json.loads((out / "train_meta.json").read_text())["images"]
    assert [Path(m["file"]).name for m in meta] == ["im0.png", "im1.png", "im2.png"]


# ----------------------------------------------------------------------------------------------
# Packing: killed part way


def h5_contents(path):
    """{dataset name: array} and attributes of an HDF5 file."""
    with h5py.File(path) as f:
        return {k: f[k][:] for k in f}, dict(f.attrs)


def assert_same_packed_output(a, b):
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    for name in names:
        if name.endswith(".h5"):
            (data_a, attrs_a), (data_b, attrs_b) = h5_contents(a / name), h5_contents(b / name)
            assert data_a.keys() == data_b.keys() and attrs_a == attrs_b
            for key in data_a:
                assert np.array_equal(data_a[key], data_b[key]), (name, key)
        else:
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def small_dataset(tmp_path, count=6):
    """`count` solid PNGs over the three splits, with a Karpathy JSON; returns the JSON's path."""
    entries = [(solid(tmp_path / f"im{i}.png").name, ["train", "val", "test"][i % 3], [f"box {i}"])
               for i in range(count)]
    return write_karpathy(tmp_path, entries)


def test_packing_refuses_to_start_on_a_disk_without_room_and_its_estimate_is_the_arrays_it_writes(
        tmp_path, monkeypatch):
    json_path, out = small_dataset(tmp_path), tmp_path / "out"
    argv = pack_args(json_path, tmp_path, out, "--max-len", 20, size=64)
    args = create_input_files.parse_args(argv)
    needed = create_input_files.packed_bytes(6, args)
    space = {"free": needed - 1}
    monkeypatch.setattr(create_input_files.shutil, "disk_usage",
                        lambda folder: SimpleNamespace(total=10 * needed, used=9 * needed, free=space["free"]))
    message = run_script(create_input_files, argv, "create_input_files.py")
    assert_one_line_error(message, "create_input_files.py", out, "GB", "--output-folder")
    assert list(out.iterdir()) == []  # nothing written
    space["free"] = needed
    create_input_files.main(argv)
    written = 0
    for split in ("train", "val", "test"):
        with h5py.File(out / f"{split}.h5") as f:
            written += sum(f[name].nbytes for name in ("images", "captions", "lengths"))
    assert written == needed


@pytest.mark.parametrize("where", ["writing an image", "closing a file", "writing the meta files"])
def test_a_disk_that_fills_while_packing_gives_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, where):
    json_path, out = small_dataset(tmp_path), tmp_path / "out"
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "writing an image":
        def add(writer, pixels, real=create_input_files.ImageChunkWriter.add):
            if writer.count == 1:
                raise full
            real(writer, pixels)
        monkeypatch.setattr(create_input_files.ImageChunkWriter, "add", add)
    elif where == "writing the meta files":  # the last large files, after the split files are closed
        def write_meta(folder, split, entries):
            raise full
        monkeypatch.setattr(create_input_files, "write_meta", write_meta)
    else:  # HDF5 writes a file's metadata when it closes it: the first close fails, as on a full disk
        closes = []
        def close(f, real=h5py.File.close):
            closes.append(f.filename)
            if len(closes) == 1:
                raise full
            real(f)
        monkeypatch.setattr(h5py.File, "close", close)
    message = run_script(create_input_files, pack_args(json_path, tmp_path, out), "create_input_files.py")
    assert_one_line_error(message, "create_input_files.py", out, "free some space", "manifest.json")
    assert list(out.iterdir()) == []  # no partial file left taking the space


def test_packing_killed_part_way_leaves_nothing_finished_and_reruns_identically(tmp_path):
    # Large noisy PNGs decode slowly (tens of ms each), so the run is surely killed in the middle.
    big = tmp_path / "images" / "big0.png"
    big.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(big)
    entries = []
    for i in range(48):
        if i:
            os.link(big, big.with_name(f"big{i}.png"))
        entries.append((f"images/big{i}.png", ["train", "val", "test"][i % 3], [f"picture number {i % 5}"]))
    json_path = write_karpathy(tmp_path, entries)
    out, reference = tmp_path / "out", tmp_path / "reference"
    argv = pack_args(json_path, tmp_path, out)

    process = subprocess.Popen([sys.executable, "create_input_files.py", *map(str, argv)], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (out / ".test.h5.partial").exists(), process)
    time.sleep(0.3)  # a few images into the run
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (out / ".train.h5.partial").exists() and not (out / "manifest.json").exists()

    message = run_script(train, train_argv(out, tmp_path / "run"), "train.py")
    assert_one_line_error(message, "train.py", out, "manifest.json", "create_input_files.py")

    create_input_files.main(argv)  # the same command again, into the same folder
    create_input_files.main(pack_args(json_path, tmp_path, reference))
    assert_same_packed_output(out, reference)


# ----------------------------------------------------------------------------------------------
# Training: resume, kills and signals


def test_resume_from_an_epoch_end_checkpoint_reproduces_the_straight_run(data, one_epoch, tmp_path):
    straight = tmp_path / "straight"
    train.main(train_argv(data, straight, epochs=2))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes((one_epoch / "last.pt").read_bytes())
    state = torch.load(resumed / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["samples_done"] == 0 and "rng" in state
    train.main(train_argv(data, resumed, "--resume", resumed / "last.pt", epochs=2))
    assert torch.load(resumed / "last.pt", weights_only=True)["epoch"] == 2
    assert_same_weights(straight / "last.pt", resumed / "last.pt")


def test_sigkill_mid_epoch_then_resume_loses_only_the_steps_since_the_checkpoint(data, tmp_path):
    argv = train_argv(data, tmp_path / "killed", "--save-every", "3", batch=4)  # 40 steps an epoch
    last = tmp_path / "killed" / "last.pt"
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(last.exists, process)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    state = torch.load(last, weights_only=True)  # whole, since it is written by rename
    assert state["epoch"] == 0 and 0 < state["samples_done"] < 160 and state["samples_done"] % 12 == 0
    assert not (tmp_path / "killed" / "metrics.csv").exists()  # the epoch never finished

    train.main(argv + ["--resume", str(last)])
    assert torch.load(last, weights_only=True)["epoch"] == 1
    # The same run without the kill: identical weights, so the resumed run redid exactly the steps
    # after the checkpoint, with the same batches and the same dropout masks.
    train.main(train_argv(data, tmp_path / "straight", "--save-every", "3", batch=4))
    assert_same_weights(tmp_path / "straight" / "last.pt", last)
    # The epoch's training loss counts the steps before the checkpoint too (carried in it).
    resumed, straight = read_history(tmp_path / "killed")[0], read_history(tmp_path / "straight")[0]
    assert float(resumed["train_loss"]) == pytest.approx(float(straight["train_loss"]), rel=1e-9)
    assert float(resumed["train_top5"]) == pytest.approx(float(straight["train_top5"]), rel=1e-9)


def test_sigint_and_sigterm_save_a_checkpoint_before_exiting(data, tmp_path):
    # One run per signal, side by side: most of each run is its interpreter's start and imports.
    runs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signum.name
        argv = train_argv(data, out, "--save-every", "1000", epochs=3, batch=4)
        runs[signum] = out, subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=ENV,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for signum, (out, process) in runs.items():
        # args.json is written right before the first step, once the signal handlers are in place.
        wait_for(lambda: (out / "args.json").exists(), process)
        process.send_signal(signum)
    for signum, (out, process) in runs.items():
        _, stderr = process.communicate(timeout=60)
        stderr = stderr.decode()
        assert process.returncode == 128 + signum, stderr
        assert "Traceback" not in stderr and f"stopped by signal {int(signum)}" in stderr
        state = checkpoints.load_checkpoint(out / "last.pt")
        assert state["samples_done"] > 0 and state["samples_done"] % 4 == 0
        assert state["epoch"] < 3


def sigterm_at_training_step(monkeypatch, step):
    """This process sends itself SIGTERM during training step `step` (counted from 0 over the run),
    after the step's stop flags were read: train.py stops after the next step, as with a real signal."""
    calls, top5_correct = [0], train.top5_correct

    def top5_then_signal(*args):
        calls[0] += 1
        if calls[0] == step + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return top5_correct(*args)

    monkeypatch.setattr(train, "top5_correct", top5_then_signal)


@pytest.mark.parametrize("model", [[], HARD_DEEP], ids=["soft", "hard-deep"])
def test_grouped_steps_stop_on_sigterm_mid_epoch_and_resume_exactly(data, tmp_path, monkeypatch, model):
    # 32 train images x 5 captions in steps of 2 images x 5 captions: 16 steps an epoch. A hard model
    # also resumes its sampling generator and its REINFORCE baseline mid-epoch.
    grouped = ["--captions-per-image-per-step", "5", *model]
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        sigterm_at_training_step(patch, 2)
        with pytest.raises(SystemExit) as exit_info:
            train.main(train_argv(data, stopped, *grouped, batch=10))
    assert exit_info.value.code == 128 + signal.SIGTERM
    state = checkpoints.load_checkpoint(stopped / "last.pt")
    assert state["epoch"] == 0 and state["samples_done"] == 4 * 10  # stopped after step 3, mid-epoch

    # Another grouping would train another order of captions for the rest of the epoch: refused.
    message = run_script(train, train_argv(data, stopped, *model, "--resume", stopped / "last.pt", batch=10),
                         "train.py")
    assert_one_line_error(message, "train.py", stopped / "last.pt", "--captions-per-image-per-step 5")

    train.main(train_argv(data, stopped, *grouped, "--resume", stopped / "last.pt", batch=10))
    train.main(train_argv(data, tmp_path / "straight", *grouped, batch=10))
    resumed = checkpoints.load_checkpoint(stopped / "last.pt")
    assert resumed["epoch"] == 1
    assert_same_weights(tmp_path / "straight" / "last.pt", stopped / "last.pt")
    assert resumed["hard_baseline"] == checkpoints.load_checkpoint(tmp_path / "straight" / "last.pt")["hard_baseline"]


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint(path, {"format_version": 1, "weights": torch.ones(3)})
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", dies_half_way)
    with pytest.raises(utils.UserError, match="disk filled up .* still whole"):
        checkpoints.save_checkpoint(path, {"format_version": 1, "weights": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left

    def replace_fails(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(utils.os, "replace", replace_fails)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(path, {"format_version": 1, "weights": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class FillsUp:
    """A file on a disk with `room` bytes left: the write that would pass it fails with ENOSPC."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_disk_that_fills_while_saving_a_checkpoint_gives_one_line_and_keeps_the_one_before(data, one_epoch,
                                                                                              tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    files = sorted(p.name for p in run.iterdir())
    kept = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.csv")}

    def atomic_write_on_a_full_disk(path, write_fn, binary=False, real=utils.atomic_write):
        real(path, lambda f: write_fn(FillsUp(f, room=100_000)), binary)

    # torch.save's own failure, which is a RuntimeError ("unexpected pos") raised from the OSError
    monkeypatch.setattr(checkpoints, "atomic_write", atomic_write_on_a_full_disk)
    message = run_script(train, train_argv(data, run, "--resume", run / "last.pt", epochs=2), "train.py")
    assert_one_line_error(message, "train.py", run / "last.pt", "disk filled up", "still whole", "--resume")
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert sorted(p.name for p in run.iterdir()) == files  # no temporary file beside them


def test_a_full_disk_elsewhere_is_one_line_naming_the_file_and_other_errors_stay_tracebacks():
    def full():
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "runs/coco/metrics.csv")

    def broken():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(full, "eval.py")
    assert exit_info.value.code == ("eval.py: error: the disk filled up writing runs/coco/metrics.csv (Disk quota "
                                    "exceeded); free some space and run again")
    with pytest.raises(OSError, match="Input/output"):
        utils.run_main(broken, "eval.py")


# ----------------------------------------------------------------------------------------------
# Training: NaN / inf


def poison_training_loss(monkeypatch, poison, first, last=None):
    """Make train.caption_loss apply `poison` to its loss in training steps `first` to `last`
    (counted from 1 over the whole run; validation, which runs without gradients, is not counted)."""
    real = train.caption_loss
    count = {"n": 0}

    def patched(*args, **kwargs):
        loss, scores, targets = real(*args, **kwargs)
        if torch.is_grad_enabled():
            count["n"] += 1
            if first <= count["n"] <= (last or count["n"]):
                loss = poison(loss)
        return loss, scores, targets

    monkeypatch.setattr(train, "caption_loss", patched)


class InfGradient(torch.autograd.Function):
    """Identity forward; backward sends an infinite gradient (an overflow)."""

    poison = float("inf")

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @classmethod
    def backward(cls, ctx, grad):
        return grad * cls.poison


class NanGradient(InfGradient):
    """Identity forward; backward sends a NaN gradient while the loss stays finite."""

    poison = float("nan")


def assert_finite_checkpoint(path):
    assert all(torch.isfinite(v).all() for v in weights(path).values() if v.is_floating_point())


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # 10 training steps an epoch: the 13th is epoch 1, step 2.
    poison_training_loss(monkeypatch, lambda loss: loss * float("nan"), 13)
    message = run_script(train, train_argv(data, out, epochs=3), "train.py")
    assert_one_line_error(message, "train.py", "epoch 1, step 2", out / "last.pt", "nan")
    state = checkpoints.load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1  # the epoch-end checkpoint, untouched
    assert_finite_checkpoint(out / "last.pt")


@pytest.mark.parametrize("poisoned", [InfGradient, NanGradient])
def test_inf_or_nan_gradient_stops_instead_of_being_clipped_into_the_weights(data, tmp_path, monkeypatch,
                                                                              poisoned):
    out = tmp_path / "run"
    poison_training_loss(monkeypatch, poisoned.apply, 3)  # epoch 0, step 2
    message = run_script(train, train_argv(data, out, "--save-every", "1"), "train.py")
    assert_one_line_error(message, "train.py", "gradient", "epoch 0, step 2", out / "last.pt")
    assert checkpoints.load_checkpoint(out / "last.pt")["samples_done"] == 2 * 16
    assert_finite_checkpoint(out / "last.pt")


@pytest.mark.parametrize("model", [[], HARD_DEEP], ids=["soft", "hard-deep"])
def test_a_nan_loss_in_a_grouped_step_stops_before_the_update(data, tmp_path, monkeypatch, model):
    out = tmp_path / "run"
    poison_training_loss(monkeypatch, lambda loss: loss * float("nan"), 3)  # epoch 0, step 2
    message = run_script(train, train_argv(data, out, "--save-every", "1", "--captions-per-image-per-step", "5",
                                           *model, batch=10), "train.py")
    assert_one_line_error(message, "train.py", "epoch 0, step 2", out / "last.pt", "nan")
    assert checkpoints.load_checkpoint(out / "last.pt")["samples_done"] == 2 * 10
    assert_finite_checkpoint(out / "last.pt")


def infinite_gradient_once(monkeypatch, step):
    """At training step `step` (counted from 1), make the output layer's bias gradient +inf and nothing
    else: no NaN anywhere, so only the order of the checks decides whether it is caught."""
    real_forward = models.DecoderWithAttention.forward
    calls = []

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(None)
            if len(calls) == step:
                fired = []

                def to_inf(grad):
                    if fired:
                        return grad
                    fired.append(None)
                    return torch.full_like(grad, float("inf"))

                self.fc.bias.register_hook(to_inf)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(models.DecoderWithAttention, "forward", forward)


def test_an_infinite_gradient_without_nan_stops_before_clipping_could_hide_it(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    infinite_gradient_once(monkeypatch, 3)  # epoch 0, step 2
    message = run_script(train, train_argv(data, out, "--save-every", "1"), "train.py")
    assert_one_line_error(message, "train.py", "gradient", "epoch 0, step 2", out / "last.pt")
    assert checkpoints.load_checkpoint(out / "last.pt")["samples_done"] == 2 * 16
    assert_finite_checkpoint(out / "last.pt")


def test_fp16_skipped_step_is_not_an_error(data, tmp_path, monkeypatch):
    # fp16 autocast and GradScaler work on the CPU in this torch: an overflowing gradient makes the
    # scaler skip that step and halve its scale, and training goes on.
    out = tmp_path / "run"
    poison_training_loss(monkeypatch, InfGradient.apply, 2, 2)
    assert train.main(train_argv(data, out, "--amp", "fp16"))  # finishes
    state = checkpoints.load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["scaler"]["scale"] < 65536.0
    assert_finite_checkpoint(out / "last.pt")


# ----------------------------------------------------------------------------------------------
# Which checkpoint is kept, when learning rates decay, when training stops


def scripted_validation(monkeypatch, bleu4s):
    """Validation reports these decoded BLEU-4 figures, one per epoch, instead of decoding."""
    figures = iter(bleu4s)

    def validate(*args, **kwargs):
        return {"val_tf_loss": 1.0, "val_tf_top5": 0.5, "val_decoded_bleu4": next(figures)}, []

    monkeypatch.setattr(train, "validate", validate)


def read_history(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_best_checkpoint_is_the_epoch_with_the_highest_validation_bleu(data, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.3, 0.5, 0.5, 0.2])  # a tie does not count as better
    out = tmp_path / "run"
    train.main(train_argv(data, out, epochs=4))
    best, last = checkpoints.load_checkpoint(out / "best.pt"), checkpoints.load_checkpoint(out / "last.pt")
    assert best["epoch"] == 2 and best["best_bleu4"] == 0.5  # written after epoch 1, the first 0.5
    assert last["epoch"] == 4 and last["epochs_since_improvement"] == 2
    assert not torch.equal(best["decoder"]["fc.weight"], last["decoder"]["fc.weight"])


def test_learning_rates_decay_after_patience_epochs_without_improvement(data, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.4, 0.6, 0.3, 0.2])
    out = tmp_path / "run"
    train.main(train_argv(data, out, "--lr-decay-patience", "1", "--lr-decay-factor", "0.5", epochs=5))
    history = read_history(out)
    # No improvement after epoch 1 (decay before 2), better at 2 (none before 3), worse at 3 (decay before 4).
    assert [float(r["decoder_lr"]) for r in history] == pytest.approx([3e-3, 3e-3, 1.5e-3, 1.5e-3, 0.75e-3])
    assert [float(r["encoder_lr"]) for r in history] == pytest.approx([1e-3, 1e-3, 0.5e-3, 0.5e-3, 0.25e-3])


def test_training_stops_after_early_stop_patience_epochs_without_improvement(data, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.4, 0.3, 0.2, 0.1])
    out = tmp_path / "run"
    train.main(train_argv(data, out, "--early-stop-patience", "2", epochs=5))
    assert [int(r["epoch"]) for r in read_history(out)] == [0, 1, 2]
    assert checkpoints.load_checkpoint(out / "best.pt")["epoch"] == 1


def scripted_epochs(monkeypatch, stop_in_epoch=None, stop_after=5):
    """Training epochs that train nothing: each records (epoch, decoder learning rate, the order of the
    items it was given) into the list returned and marks them done. With `stop_in_epoch`, that epoch
    is stopped by SIGTERM after `stop_after` items, as a time limit would."""
    seen = []

    def train_one_epoch(run, loader, stop, show_progress=True, on_step=None):
        order = list(loader.sampler)
        seen.append((run.progress.epoch, run.optimizers["decoder"].param_groups[0]["lr"], order))
        if run.progress.epoch == stop_in_epoch and run.progress.samples_done == 0:
            run.progress.samples_done += stop_after
            stop.signal = signal.SIGTERM
            return True
        run.progress.samples_done += len(order)
        return False

    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
    return seen


# BLEU-4 per epoch: no improvement after epoch 0 until epoch 4, so with patience 2 the rates decay once,
# before epoch 3 (2 epochs without improving), and not before epoch 4 (3 epochs: not a multiple of 2).
SCHEDULE_BLEU4 = [0.5, 0.4, 0.3, 0.2, 0.6, 0.1]
SCHEDULE = ["--lr-decay-patience", "2", "--lr-decay-factor", "0.5"]


def test_the_sampler_reshuffles_every_epoch_and_rates_decay_once_however_the_run_is_resumed(data, tmp_path,
                                                                                            monkeypatch):
    scripted_validation(monkeypatch, SCHEDULE_BLEU4)
    straight = scripted_epochs(monkeypatch)
    train.main(train_argv(data, tmp_path / "straight", *SCHEDULE, epochs=6))
    assert [lr for _, lr, _ in straight] == pytest.approx([3e-3] * 3 + [1.5e-3] * 3)
    orders = [order for _, _, order in straight]
    items = len(CaptionDataset(data, "train"))
    assert all(sorted(order) == list(range(items)) for order in orders)  # every caption once an epoch
    assert len({tuple(order) for order in orders}) == 6  # in a new order every epoch

    # Stopped in epoch 3, just after the decay, then resumed: the decay is not applied again, and the
    # epoch goes on with the items it had not reached, in the same order.
    scripted_validation(monkeypatch, SCHEDULE_BLEU4)
    stopped = scripted_epochs(monkeypatch, stop_in_epoch=3)
    argv = train_argv(data, tmp_path / "stopped", *SCHEDULE, epochs=6)
    with pytest.raises(SystemExit):
        train.main(argv)
    train.main(argv + ["--resume", str(tmp_path / "stopped" / "last.pt")])
    assert stopped[:4] == straight[:4] and stopped[4] == (3, pytest.approx(1.5e-3), straight[3][2][5:])
    assert stopped[5:] == straight[4:]

    # Resumed at epoch boundaries: before the decay (at the end of epoch 2) and just after it (epoch 3).
    scripted_validation(monkeypatch, SCHEDULE_BLEU4)
    resumed = scripted_epochs(monkeypatch)
    out = tmp_path / "resumed"
    for epochs in (3, 4, 6):
        train.main(train_argv(data, out, *SCHEDULE, epochs=epochs)
                   + (["--resume", str(out / "last.pt")] if epochs > 3 else []))
    assert resumed == straight
    assert [float(r["decoder_lr"]) for r in read_history(out)] == [lr for _, lr, _ in straight]
    assert checkpoints.load_checkpoint(out / "last.pt")["decoder_optimizer"]["param_groups"][0]["lr"] == 1.5e-3


# ----------------------------------------------------------------------------------------------
# Resume with other arguments


def test_resume_with_other_architecture_arguments_names_them(data, one_epoch, tmp_path):
    argv = train_argv(data, tmp_path / "run", "--resume", one_epoch / "last.pt", epochs=2)
    argv[argv.index("--decoder-dim") + 1] = "48"
    argv[argv.index("--encoder-cut-after") + 1] = "layer3"
    message = run_script(train, argv, "train.py")
    assert_one_line_error(message, "train.py", one_epoch / "last.pt", "--decoder-dim 32 (checkpoint) vs 48",
                          "--encoder-cut-after layer2 (checkpoint) vs layer3")
    assert "--embed-dim" not in message and "--attention-dim" not in message
    assert not (tmp_path / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# Pretrained weights with no network


def test_pretrained_weights_offline_say_what_to_pass(data, tmp_path):
    # The download must fail here, whether or not this machine has a network: an empty TORCH_HOME
    # (no cached weights) and a proxy on a closed local port.
    env = {**ENV, "TORCH_HOME": str(tmp_path / "torch_home"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    argv = [a for a in train_argv(data, tmp_path / "run") if a != "--no-pretrained"] + ["--pretrained"]
    result = run_subprocess("train.py", *argv, env=env)  # resnet18: a download of 45 MB, if it could
    assert_process_error(result, "--no-pretrained", "--encoder-weights", "resnet18")
    assert result.returncode == 1
    assert not list((tmp_path / "torch_home").rglob("*.pth"))


# ----------------------------------------------------------------------------------------------
# eval.py and caption.py: checkpoints, data folders and images that do not fit


@pytest.fixture(scope="module")
def misfits(data, one_epoch, tmp_path_factory):
    """Files eval.py and caption.py must refuse, by name."""
    folder = tmp_path_factory.mktemp("misfits")
    good = checkpoints.load_checkpoint(one_epoch / "last.pt")
    files = {}

    # Weights of another vocabulary than the word map stored beside them.
    state = dict(good, word_map={**good["word_map"], "zebra": len(good["word_map"])})
    files["other_vocabulary"] = folder / "other_vocabulary.pt"
    checkpoints.save_checkpoint(files["other_vocabulary"], state)
    # Weights of another architecture than the arguments stored beside them.
    state = dict(good, args={**good["args"], "decoder_dim": 48})
    files["other_architecture"] = folder / "other_architecture.pt"
    checkpoints.save_checkpoint(files["other_architecture"], state)
    # Not checkpoints at all.
    files["random_bytes"] = folder / "random.pt"
    files["random_bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["json"] = folder / "config.pt"
    files["json"].write_text(json.dumps({"encoder": 1, "decoder": 2}))
    files["empty"] = folder / "empty.pt"
    files["empty"].write_bytes(b"")
    files["state_dict_only"] = folder / "state_dict_only.pt"
    torch.save(good["decoder"], files["state_dict_only"])
    files["missing"] = folder / "missing.pt"
    # A whole pickled model, as the original tutorial saved them: never unpickled.
    files["pickled_module"] = folder / "pickled_module.pt"
    torch.save({"format_version": 1, "encoder": torch.nn.Linear(2, 2), "decoder": {}, "args": {},
                "word_map": {}}, files["pickled_module"])
    # Arguments that name no model this code builds.
    state = dict(good, args={**good["args"], "encoder_arch": "vgg16"})
    files["unknown_architecture"] = folder / "unknown_architecture.pt"
    checkpoints.save_checkpoint(files["unknown_architecture"], state)
    # A valid checkpoint trained on another word map than the data folder's.
    state = dict(good, word_map={k if k.startswith("<") else k + "x": v for k, v in good["word_map"].items()})
    files["other_word_map"] = folder / "other_word_map.pt"
    checkpoints.save_checkpoint(files["other_word_map"], state)
    return files


@pytest.mark.parametrize("kind", ["other_vocabulary", "other_architecture", "unknown_architecture", "random_bytes",
                                  "json", "empty", "state_dict_only", "pickled_module", "missing"])
@pytest.mark.parametrize("script", ["eval", "caption"])
def test_eval_and_caption_refuse_a_bad_checkpoint_in_one_line(script, kind, misfits, raw, data, tmp_path):
    path = misfits[kind]
    if script == "eval":
        argv = ["--checkpoint", path, "--data-folder", data, "--workers", "0", "--no-coco-metrics",
                "--output-dir", tmp_path]
        module = evaluate_script
    else:
        argv = ["--checkpoint", path, "--img", raw / "images" / "shapes_000000.jpg"]
        module = caption
    message = run_script(module, argv, f"{script}.py")
    assert_one_line_error(message, f"{script}.py", path)
    assert not list(tmp_path.iterdir())


def test_eval_refuses_a_data_folder_from_another_word_map(misfits, data, tmp_path):
    message = run_script(evaluate_script, ["--checkpoint", misfits["other_word_map"], "--data-folder", data,
                                           "--workers", "0", "--output-dir", tmp_path], "eval.py")
    assert_one_line_error(message, "eval.py", data / "word_map.json", misfits["other_word_map"])
    assert not list(tmp_path.iterdir())


def test_eval_refuses_an_unfinished_data_folder(one_epoch, data, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("word_map.json", "test.h5"):
        (unfinished / name).write_bytes((data / name).read_bytes())
    message = run_script(evaluate_script, ["--checkpoint", one_epoch / "last.pt", "--data-folder", unfinished,
                                           "--workers", "0", "--output-dir", tmp_path / "eval"], "eval.py")
    assert_one_line_error(message, "eval.py", unfinished, "manifest.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    message = run_script(evaluate_script, ["--checkpoint", one_epoch / "last.pt", "--data-folder", empty,
                                           "--workers", "0", "--output-dir", tmp_path / "eval"], "eval.py")
    assert_one_line_error(message, "eval.py", empty, "manifest.json")
    assert not (tmp_path / "eval").exists()


def test_caption_refuses_unreadable_images_and_empty_folders(one_epoch, tmp_path):
    (tmp_path / "bad").mkdir()
    bad = bad_files(tmp_path / "bad")
    checkpoint = one_epoch / "last.pt"
    for kind in ("empty", "truncated", "not_an_image", "missing"):
        message = run_script(caption, ["--img", bad[kind], "--checkpoint", checkpoint], "caption.py")
        assert_one_line_error(message, "caption.py", bad[kind])
    empty_folder = tmp_path / "no_images"
    empty_folder.mkdir()
    (empty_folder / "notes.txt").write_text("no pictures here")
    message = run_script(caption, ["--img", empty_folder, "--checkpoint", checkpoint], "caption.py")
    assert_one_line_error(message, "caption.py", empty_folder, "no images")


def run_subprocesses_at_once(*commands, timeout=120):
    """Run repository scripts side by side, each command a (script, *args); returns their
    CompletedProcesses. Most of such a run is its interpreter's start and imports, which overlap."""
    processes = [subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO, env=ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script, *args in commands]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def test_eval_and_caption_errors_from_the_command_line(misfits, data, raw, tmp_path):
    eval_result, caption_result = run_subprocesses_at_once(
        ("eval.py", "--checkpoint", misfits["json"], "--data-folder", data, "--workers", "0", "--output-dir", tmp_path),
        ("caption.py", "--img", tmp_path, "--checkpoint", misfits["other_vocabulary"]))
    assert_process_error(eval_result, misfits["json"], "not a checkpoint")
    assert_process_error(caption_result, tmp_path, "no images")


def test_ctrl_c_outside_the_training_loop_exits_130_in_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(interrupted, "create_input_files.py")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "create_input_files.py: interrupted\n"
