"""load_image's simplejpeg path gives exactly the pixels of Pillow's draft mode, and leaves to Pillow
every file it should not take (a plain JPEG without EXIF, XMP or MPF is not even opened by Pillow);
create_input_files.py packs without importing torch; its decoding threads leave the warning filters as
they are, and packing hides Pillow's warnings."""
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import create_input_files
import utils
from conftest import pack_args, write_karpathy
from utils import UserError, load_image

ROOT = Path(__file__).resolve().parents[1]
EXIF_ORIENTATION = 0x0112


def noisy(height, width, seed=0):
    """(H, W, 3) uint8: a gradient with noise, so the scaled decodes differ from one another."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    return np.clip(gradient + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def save(path, pixels, mode="RGB", **options):
    Image.fromarray(pixels).convert(mode).save(path, **options)
    return path


@pytest.fixture
def decode_calls(monkeypatch):
    """The files simplejpeg is asked to decode, in order."""
    calls = []
    real = utils.simplejpeg.decode_jpeg

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(utils.simplejpeg, "decode_jpeg", counting)
    return calls


def pillow_only(path, size, monkeypatch):
    """load_image as it was before simplejpeg: every JPEG through Pillow's draft mode."""
    with monkeypatch.context() as m:
        m.setattr(utils, "simplejpeg", None)
        return load_image(path, size)


# One JPEG for each scale draft mode picks at size 16 (it asks for 14 pixels a side): 1/1, 1/2, 1/4,
# 1/8; odd sides, so the scaled sides round up.
@pytest.mark.parametrize("height,width", [(20, 17), (31, 45), (61, 117), (113, 231), (480, 640)])
def test_plain_jpegs_decode_to_the_pixels_of_pillow_draft_mode(tmp_path, monkeypatch, decode_calls, height, width):
    path = save(tmp_path / "photo.jpg", noisy(height, width), quality=90)
    fast = load_image(path, 16)
    assert decode_calls == [path.stat().st_size]  # it did take the simplejpeg path
    assert fast.shape == (3, 16, 16) and fast.dtype == np.uint8
    assert np.array_equal(fast, pillow_only(path, 16, monkeypatch))


@pytest.mark.parametrize("options", [{"progressive": True}, {"subsampling": 0}, {"subsampling": 1}])
def test_progressive_and_other_subsampling_jpegs_match_pillow(tmp_path, monkeypatch, decode_calls, options):
    path = save(tmp_path / "photo.jpg", noisy(97, 130, seed=1), quality=85, **options)
    assert np.array_equal(load_image(path, 24), pillow_only(path, 24, monkeypatch))
    assert decode_calls


def test_greyscale_jpeg_decodes_to_grey_rgb_like_pillow(tmp_path, monkeypatch, decode_calls):
    path = save(tmp_path / "grey.jpg", noisy(70, 90, seed=2), mode="L")
    pixels = load_image(path, 16)
    assert decode_calls
    assert np.array_equal(pixels, pillow_only(path, 16, monkeypatch))
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[1], pixels[2])


def test_tiny_jpeg_where_simplejpeg_would_pick_another_scale_goes_through_pillow(tmp_path, monkeypatch,
                                                                                   decode_calls):
    # 6x6 at size 2 (draft side 2): draft mode decodes at 1/2 (3x3), and libjpeg-turbo's 3/8 also
    # gives 3x3, which simplejpeg would prefer; so Pillow decodes it.
    path = save(tmp_path / "tiny.jpg", noisy(6, 6, seed=3))
    assert np.array_equal(load_image(path, 2), pillow_only(path, 2, monkeypatch))
    assert decode_calls == []


def test_cmyk_jpeg_goes_through_pillow(tmp_path, monkeypatch, decode_calls):
    path = save(tmp_path / "cmyk.jpg", noisy(60, 80, seed=4), mode="CMYK")
    assert Image.open(path).mode == "CMYK"
    pixels = load_image(path, 16)
    assert decode_calls == []
    assert np.array_equal(pixels, pillow_only(path, 16, monkeypatch))


@pytest.mark.parametrize("suffix", [".png", ".webp", ".bmp"])
def test_other_formats_go_through_pillow(tmp_path, decode_calls, suffix):
    pixels = noisy(40, 50, seed=5)
    path = save(tmp_path / f"image{suffix}", pixels)
    packed = load_image(path, 50)
    assert decode_calls == []
    expected = np.asarray(Image.open(path).convert("RGB").resize((50, 50), Image.Resampling.BICUBIC))
    assert np.array_equal(packed, expected.transpose(2, 0, 1))
    assert packed.flags.c_contiguous and packed.flags.writeable  # torch.from_numpy takes it as it is


def test_exif_orientation_is_honoured(tmp_path, monkeypatch, decode_calls):
    # Left half dark, right half bright; EXIF 6 says "rotate 90 degrees clockwise to view", which
    # puts the dark half on top.
    pixels = np.full((60, 80, 3), 230, dtype=np.uint8)
    pixels[:, :40] = 20
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = save(tmp_path / "rotated.jpg", pixels, exif=exif.tobytes(), quality=95)
    upright = load_image(path, 16)
    assert upright[:, :6].mean() < 60 and upright[:, 10:].mean() > 190  # dark on top
    assert np.array_equal(upright, pillow_only(path, 16, monkeypatch))
    assert decode_calls == []  # rotated files are Pillow's


def test_exif_orientation_1_takes_the_fast_path(tmp_path, monkeypatch, decode_calls):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 1
    path = save(tmp_path / "upright.jpg", noisy(50, 70, seed=6), exif=exif.tobytes())
    assert np.array_equal(load_image(path, 16), pillow_only(path, 16, monkeypatch))
    assert decode_calls


def test_plain_jpeg_without_exif_is_decoded_without_pillow_opening_it(tmp_path, monkeypatch, decode_calls):
    path = save(tmp_path / "photo.jpg", noisy(120, 160, seed=8), quality=90)
    expected = pillow_only(path, 16, monkeypatch)

    def refuse(*args, **kwargs):
        raise AssertionError("Image.open called")

    monkeypatch.setattr(utils.Image, "open", refuse)
    assert np.array_equal(load_image(path, 16), expected)
    assert decode_calls == [path.stat().st_size]


XMP_ROTATED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def test_jpeg_with_xmp_orientation_goes_through_pillow_and_is_rotated(tmp_path, monkeypatch, decode_calls):
    pixels = np.full((60, 80, 3), 230, dtype=np.uint8)
    pixels[:, :40] = 20
    path = save(tmp_path / "rotated.jpg", pixels, xmp=XMP_ROTATED, quality=95)
    upright = load_image(path, 16)
    assert upright[:, :6].mean() < 60 and upright[:, 10:].mean() > 190  # Pillow read the XMP: dark on top
    assert np.array_equal(upright, pillow_only(path, 16, monkeypatch))
    assert decode_calls == []


def test_mpo_goes_through_pillow_as_before(tmp_path, monkeypatch, decode_calls):
    frame = Image.fromarray(noisy(120, 160, seed=9))
    path = tmp_path / "stereo.jpg"
    frame.save(path, format="MPO", save_all=True, append_images=[frame])
    assert Image.open(path).format == "MPO"  # not JPEG to Pillow, so never drafted
    assert np.array_equal(load_image(path, 16), pillow_only(path, 16, monkeypatch))
    assert decode_calls == []


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_corrupt_jpeg_gets_the_same_clear_error(tmp_path, monkeypatch, keep):
    data = io.BytesIO()
    Image.fromarray(noisy(120, 160, seed=7)).save(data, format="JPEG")
    path = tmp_path / "broken.jpg"
    path.write_bytes(data.getvalue()[:int(len(data.getvalue()) * keep)])
    with pytest.raises(UserError) as fast:
        load_image(path, 16)
    with pytest.raises(UserError) as pillow:
        pillow_only(path, 16, monkeypatch)
    assert str(fast.value) == str(pillow.value)
    assert str(fast.value).startswith(f"{path}: cannot decode image (")


def test_create_input_files_packs_without_importing_torch(tmp_path):
    images = []
    for i in range(3):
        save(tmp_path / f"img{i}.jpg", noisy(40, 50, seed=i))
        images.append({"filepath": "", "filename": f"img{i}.jpg", "split": ["train", "val", "test"][i],
                       "imgid": i, "sentences": [{"tokens": ["a", "red", "square"]}]})
    (tmp_path / "captions.json").write_text(json.dumps({"images": images}))
    script = ("import sys, create_input_files\n"
              f"create_input_files.main(['--karpathy-json', {str(tmp_path / 'captions.json')!r}, "
              f"'--image-folder', {str(tmp_path)!r}, '--output-folder', {str(tmp_path / 'out')!r}, "
              "'--image-size', '16', '--min-word-freq', '1', '--workers', '2'])\n"
              "print('torch imported:', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert "torch imported: False" in result.stdout


def test_decoding_in_threads_never_touches_the_warning_filters(tmp_path, monkeypatch):
    """Not while the threads decode, nor after: warnings.catch_warnings around each decode swaps the
    process's filters, and two threads leaving it out of order left every warning ignored."""
    filters_seen = []  # the filters in force as each image is resized

    def recording(image, size, squared=utils._squared):
        filters_seen.append(list(warnings.filters))
        return squared(image, size)

    monkeypatch.setattr(utils, "_squared", recording)
    paths = [save(tmp_path / f"{i}.jpg", noisy(48, 48, seed=i), quality=90) for i in range(30)]
    paths += [save(tmp_path / f"{i}.png", noisy(48, 48, seed=i)) for i in range(30)]  # Pillow opens these
    with warnings.catch_warnings(record=True) as shown:
        before = list(warnings.filters)
        results = list(create_input_files.decode_images([{"path": p} for p in paths], 32, workers=2, batch=1))
        after = list(warnings.filters)
        warnings.warn("a warning of the caller's own")
    assert [error for _, _, error in results] == [None] * len(paths)
    assert filters_seen == [before] * len(paths) and after == before
    assert [str(w.message) for w in shown] == ["a warning of the caller's own"]


def test_packing_hides_pillows_warnings_about_files_it_decodes(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)  # larger images warn (DecompressionBombWarning)
    entries = [(f"{i}.png", split, ["a noisy square"]) for i, split in enumerate(["train"] * 6 + ["val", "test"])]
    for i, (name, _, _) in enumerate(entries):
        save(tmp_path / name, noisy(48, 48, seed=i))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # as a fresh process shows a warning the first time
        with pytest.warns(Image.DecompressionBombWarning):  # these files do warn
            load_image(tmp_path / "0.png", 32)
        manifest = create_input_files.main(pack_args(write_karpathy(tmp_path, entries), tmp_path, tmp_path / "out",
                                                     "--workers", "2"))
    assert manifest["images"] == {"train": 6, "val": 1, "test": 1}
    assert [str(w.message) for w in shown] == []


def test_a_float_image_with_nan_and_infinite_values_scales_its_finite_values_without_a_warning(tmp_path):
    """Missing data marked NaN or infinite turns black and the rest scales by its own peak (one such pixel
    made the whole image black), without NumPy's warning about the cast (load_image no longer hides every
    warning around a decode)."""
    values = np.array([[np.nan, np.inf, -np.inf], [0.0, 100.0, 300.0]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "depth.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(tmp_path / "depth.tif") as image:
            grey = np.asarray(utils._to_rgb(image))[..., 0]
        pixels = load_image(tmp_path / "depth.tif", 8)
    assert grey.tolist() == [[0, 0, 0], [0, 85, 255]]  # 100 and 300 of a peak of 300
    assert pixels.shape == (3, 8, 8) and pixels.dtype == np.uint8
