"""Fuzzing the packing step: every file is either packed or refused with the documented UserError.

Hundreds of random byte strings (some behind real image magic bytes), damaged real images and valid
images of every mode, size and EXIF orientation go through utils.load_image, which is what
create_input_files.py runs per image; then one packing run with --skip-bad-images over a mixed folder.
All cases come from one seeded generator, so a failure names a case that reproduces.
"""
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import create_input_files
from utils import UserError, load_image

SIZE = 16
MAGIC = {"none": b"", "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "png": b"\x89PNG\r\n\x1a\n", "gif": b"GIF89a",
         "bmp": b"BM", "tiff": b"II*\x00", "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 "}
# File formats Pillow writes for each mode (what a dataset folder can hold).
FORMATS = {"1": ["PNG", "BMP", "TIFF", "GIF"], "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"],
           "LA": ["PNG", "TIFF"], "P": ["PNG", "GIF", "TIFF", "BMP"], "PA": ["TIFF"],
           "RGB": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"], "RGBA": ["PNG", "TIFF", "WEBP"],
           "CMYK": ["JPEG", "TIFF"], "YCbCr": ["TIFF", "JPEG"], "LAB": ["TIFF"], "I": ["TIFF"],
           "I;16": ["PNG", "TIFF"], "I;16B": ["TIFF"], "F": ["TIFF"]}
EXIF_FORMATS = {"JPEG", "PNG", "TIFF", "WEBP"}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "WEBP": ".webp"}


def random_size(rng):
    """Mostly small sizes, with 1x1, single rows and columns and very wide or tall images."""
    kind = rng.integers(6)
    if kind == 0:
        return 1, 1
    if kind == 1:
        return int(rng.integers(1, 3000)), 1
    if kind == 2:
        return 1, int(rng.integers(1, 3000))
    if kind == 3:
        return int(rng.integers(500, 4000)), int(rng.integers(1, 4))
    return int(rng.integers(1, 90)), int(rng.integers(1, 90))


def random_image_file(rng):
    """(bytes, format, mode) of a valid image: random mode, size, pixels, and sometimes EXIF orientation."""
    mode = list(FORMATS)[rng.integers(len(FORMATS))]
    fmt = FORMATS[mode][rng.integers(len(FORMATS[mode]))]
    size = random_size(rng)
    if fmt in ("JPEG", "WEBP"):
        size = (min(size[0], 2000), min(size[1], 2000))  # their encoders' limits are 65535 / 16383
    image = Image.new(mode, size)
    raw = rng.bytes(len(image.tobytes()))
    image.frombytes(raw)
    if mode in ("P", "PA"):
        image.putpalette(list(rng.integers(0, 256, 768)))
    options = {}
    if fmt in EXIF_FORMATS and rng.random() < 0.5:
        exif = Image.Exif()
        exif[0x0112] = int(rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 255]))  # some out of range
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue(), fmt, mode


def random_bad_bytes(rng, valid_files):
    """(bytes, description): random bytes behind a magic number, or a valid image truncated or corrupted."""
    kind = rng.integers(3)
    if kind == 0 or not valid_files:
        magic = list(MAGIC)[rng.integers(len(MAGIC))]
        return MAGIC[magic] + rng.bytes(int(rng.integers(0, 3000))), f"random bytes after {magic} magic"
    data, fmt, mode = valid_files[rng.integers(len(valid_files))]
    if kind == 1:
        cut = int(rng.integers(0, len(data)))
        return data[:cut], f"{fmt} {mode} cut to {cut} of {len(data)} bytes"
    corrupted = bytearray(data)
    for position in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
        corrupted[position] = int(rng.integers(256))
    return bytes(corrupted), f"{fmt} {mode} with bytes overwritten"


def check_outcome(path, description):
    """load_image packs the file or raises the documented UserError naming it; nothing else."""
    try:
        pixels = load_image(path, SIZE)
    except UserError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, (description, message)
        return None
    except Exception as exc:  # noqa: BLE001 - any other exception is the bug this test looks for
        pytest.fail(f"{description}: {exc.__class__.__name__}: {exc}")
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == np.uint8, description
    return pixels


def test_valid_images_of_every_mode_and_size_always_pack(tmp_path):
    rng = np.random.default_rng(20240501)
    seen = set()
    for case in range(150):
        data, fmt, mode = random_image_file(rng)
        path = tmp_path / f"valid_{case}{SUFFIX[fmt]}"
        path.write_bytes(data)
        with Image.open(path) as opened:
            description = f"case {case}: valid {fmt} of mode {mode} ({opened.mode}), size {opened.size}"
        assert check_outcome(path, description) is not None, f"{description} was refused"
        seen.add((mode, fmt))
    assert len({m for m, _ in seen}) == len(FORMATS)  # every mode was tried


def test_random_and_damaged_bytes_pack_or_give_the_documented_error(tmp_path):
    rng = np.random.default_rng(7)
    valid = [random_image_file(rng) for _ in range(30)]
    outcomes = {"packed": 0, "refused": 0}
    for case in range(400):
        data, description = random_bad_bytes(rng, valid)
        path = tmp_path / f"fuzz_{case}.jpg"
        path.write_bytes(data)
        pixels = check_outcome(path, f"case {case}: {description}")
        outcomes["packed" if pixels is not None else "refused"] += 1
    assert outcomes["refused"] > 200  # the cases really are mostly broken


def test_packing_a_mixed_folder_with_skip_bad_images(tmp_path, capsys):
    rng = np.random.default_rng(3)
    entries, good, bad = [], [], []
    for i in range(36):
        if i % 3:
            data, fmt, _ = random_image_file(rng)
            name = f"good_{i}{SUFFIX[fmt]}"
            good.append(name)
        else:
            magic = list(MAGIC)[i % len(MAGIC)]
            data, name = MAGIC[magic] + rng.bytes(200), f"bad_{i}.{magic}"
            bad.append(name)
        (tmp_path / name).write_bytes(data)
        entries.append({"filepath": "", "filename": name, "imgid": i, "split": ["train", "val", "test"][i % 3],
                        "sentences": [{"raw": f"picture {i} of things"}]})
    entries.append({"filepath": "", "filename": "never_written.png", "imgid": 99, "split": "train",
                    "sentences": [{"raw": "a missing file"}]})
    bad.append("never_written.png")
    json_path = tmp_path / "dataset.json"
    json_path.write_text(json.dumps({"images": entries}))
    out = tmp_path / "out"
    manifest = create_input_files.main(
        ["--karpathy-json", str(json_path), "--image-folder", str(tmp_path), "--output-folder", str(out),
         "--image-size", str(SIZE), "--workers", "0", "--min-word-freq", "1", "--skip-bad-images"])
    stdout = capsys.readouterr().out
    assert sorted(Path(b["file"]).name for b in manifest["bad_images"]) == sorted(bad)
    assert sum(manifest["images"].values()) == len(good) and manifest["dropped"]["bad_images"] == len(bad)
    assert f"{len(bad)} bad images" in stdout
    packed = []
    for split in ("train", "val", "test"):
        with h5py.File(out / f"{split}.h5") as f:
            assert f["images"].shape[0] == manifest["images"][split]
        packed += [Path(m["file"]).name for m in json.loads((out / f"{split}_meta.json").read_text())["images"]]
    assert sorted(packed) == sorted(good)
    assert json.loads((out / "manifest.json").read_text())["bad_images"] == manifest["bad_images"]
