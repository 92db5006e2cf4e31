"""The web page (app.py): its caption is caption.py's, bad files get a message, several users at once
get their own results, and a real browser (headless Chromium) drives the page.

The first tests need only the project's requirements and run in `make test`; those marked `page` serve
the page and need Gradio, and the browser test needs Playwright (both in requirements-app.txt) and
Debian's chromium package: `make test-app` runs those alone (`pytest -m page`).
"""
import io
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

import app
import bench_app
import caption
from utils import UserError

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# The flags that keep Chromium from calling home: no background networking, updates, sync or QUIC.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP_INSTALL = "needs the page's requirements: run these tests with `make test-app` (it installs them)"


@pytest.fixture(scope="module")
def captioner(trained_run, packed_data):
    """The page's model: the tiny trained checkpoint, with the packed data's object boxes."""
    return app.Captioner(trained_run / "best.pt", torch.device("cpu"), data_folder=packed_data)


@pytest.fixture(scope="module")
def images(shapes_raw, tmp_path_factory):
    """{kind: path} of the images a user may bring: a dataset image under another name, odd modes and sizes."""
    folder = tmp_path_factory.mktemp("uploads")
    source = sorted((shapes_raw / "images").glob("*.jpg"))[-1]
    photo = Image.open(source).convert("RGB")
    paths = {"source": source, "copy": folder / "my_photo.jpg", "other": folder / "another.jpg",
             "cmyk": folder / "cmyk.jpg", "16bit": folder / "sixteen_bit.png", "tiny": folder / "one_pixel.png", "huge": folder / "huge.jpg"}
    shutil.copyfile(source, paths["copy"])  # the dataset's own file, uploaded under another name
    shutil.copyfile(sorted((shapes_raw / "images").glob("*.jpg"))[-2], paths["other"])
    photo.convert("CMYK").save(paths["cmyk"])
    grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257  # 8 bits spread over 16
    Image.fromarray(grey).save(paths["16bit"])
    assert Image.open(paths["16bit"]).mode.startswith("I;16")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(paths["tiny"])
    photo.resize((12000, 9000), Image.Resampling.NEAREST).save(paths["huge"], quality=70)
    return paths


@pytest.fixture(scope="module")
def bad_files(images, tmp_path_factory):
    """{file name: bytes} of files that are not images the model can read."""
    good = images["copy"].read_bytes()
    return {"notes.txt": b"a shopping list, not a photo\n", "empty.jpg": b"",
            "truncated.jpg": good[:len(good) // 2], "fake.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}


@pytest.fixture(scope="module")
def hard_checkpoint(trained_run, tmp_path_factory):
    """The tiny checkpoint as a hard-attention model: the same weights, since hard attention has no others."""
    state = torch.load(trained_run / "best.pt", weights_only=True)
    state["args"]["attention"] = "hard"
    path = tmp_path_factory.mktemp("hard") / "best.pt"
    torch.save(state, path)
    return path


def caption_py_line(trained_run, path, beam_size, capsys, *flags, checkpoint=None):
    """What `caption.py --img path --beam-size N [flags]` prints for the image."""
    capsys.readouterr()
    checkpoint = checkpoint or trained_run / "best.pt"
    caption.main(["--img", str(path), "--checkpoint", str(checkpoint), "--beam-size", str(beam_size), *flags])
    return capsys.readouterr().out.strip()

# ----------------------------------------------------------------------------------------------
# What the page computes, without a server


@pytest.mark.parametrize("kind", ["copy", "cmyk", "16bit", "huge"])
def test_page_caption_is_caption_py_s_character_for_character(captioner, trained_run, images, kind, capsys):
    for beam_size in (1, 3):
        result = captioner.caption(images[kind], beam_size)
        assert result.words and result.alphas.shape == (len(result.words), captioner.grid ** 2)
        assert caption_py_line(trained_run, images[kind], beam_size, capsys) == f"{images[kind]}: {result.caption}"


def test_the_length_penalty_gives_caption_py_s_caption(captioner, trained_run, images, capsys):
    for penalty in (0.5, 2.0):
        result = captioner.caption(images["copy"], 3, length_penalty=penalty)
        line = caption_py_line(trained_run, images["copy"], 3, capsys, "--length-penalty", str(penalty))
        assert line == f"{images['copy']}: {result.caption}"


@pytest.mark.parametrize("hard_read", ["argmax", "expectation"])
def test_a_hard_model_s_page_caption_view_and_figure_are_caption_py_s(hard_checkpoint, trained_run, images,
                                                                      hard_read, capsys, tmp_path):
    hard = app.Captioner(hard_checkpoint, torch.device("cpu"))
    assert hard.hard and hard.decoder.hard_read == "argmax"  # the shared decoder is never switched
    result = hard.caption(images["copy"], 3, hard_read=hard_read)
    line = caption_py_line(trained_run, images["copy"], 3, capsys, "--hard-read", hard_read, checkpoint=hard_checkpoint)
    assert line == f"{images['copy']}: {result.caption}"
    assert result.mark_cells == (hard_read == "argmax")
    # The view marks the cell read (the argmax) in cyan, and only that cell; the expectation is a map.
    view = app.attention_view(result, 1).astype(int)
    cyan = (view == (0, 255, 255)).all(axis=-1)  # the outline's pixels
    cell = app.DISPLAY_SIDE // hard.grid
    row, col = divmod(int(result.alphas[1].argmax()), hard.grid)
    if hard_read == "argmax":
        inside = np.zeros_like(cyan)
        inside[row * cell:(row + 1) * cell + 1, col * cell:(col + 1) * cell + 1] = True
        assert cyan[row * cell + 1, col * cell + 2:(col + 1) * cell - 2].all() and not cyan[~inside].any()
        greenish = view[..., 1] - view[..., 0]  # the cyan tint raises green over red inside the cell
        assert greenish[inside & ~cyan].mean() > greenish[~inside].mean() + 30
    else:
        assert not cyan.any()
    offered = hard.figure(result)
    caption.main(["--img", str(images["copy"]), "--checkpoint", str(hard_checkpoint), "--beam-size", "3",
                  "--hard-read", hard_read, "--out", str(tmp_path / "fig.png")])
    assert offered.read_bytes() == (tmp_path / "fig.png").read_bytes()


def test_bad_files_raise_one_sentence_naming_the_upload_not_the_server_path(captioner, bad_files, tmp_path):
    for name, data in bad_files.items():
        path = tmp_path / "upload-1234" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        with pytest.raises(UserError) as caught:
            captioner.caption(path, 3)
        message = app.friendly_error(caught.value, path)
        assert message.startswith(f"{name}: ") and str(tmp_path) not in message and "\n" not in message


def test_a_one_pixel_image_is_captioned_with_a_note(captioner, images):
    result = captioner.caption(images["tiny"], 3)
    assert result.words and "1x1 pixels" in result.note
    assert captioner.caption(images["copy"], 3).note == ""


def test_an_uploaded_copy_of_a_dataset_image_gets_its_object_boxes(captioner, images):
    boxed, plain = captioner.caption(images["copy"], 3), captioner.caption(images["cmyk"], 3)
    assert boxed.objects and not plain.objects  # recognised by content, whatever the file is called
    green = (0, 255, 0)
    assert (app.attention_view(boxed, 0) == green).all(axis=-1).any()
    assert not (app.attention_view(plain, 0) == green).all(axis=-1).any()


def test_each_word_has_its_own_attention_view(captioner, images):
    result = captioner.caption(images["copy"], 3)
    assert len(result.words) >= 2
    views = [app.attention_view(result, step) for step in range(len(result.words))]
    assert all(v.shape == (app.DISPLAY_SIDE, app.DISPLAY_SIDE, 3) and v.dtype == np.uint8 for v in views)
    assert not np.array_equal(views[0], views[1])
    # Where the attention peaks the view keeps more of the photo than where it is least.
    alpha = result.alphas[1].view(captioner.grid, captioner.grid)
    cell = app.DISPLAY_SIDE // captioner.grid
    kept = views[1].astype(float).sum(axis=-1) / (result.pixels.astype(float).sum(axis=0) + 1)  # (S, S)
    row, col = divmod(int(alpha.argmax()), captioner.grid)
    low_row, low_col = divmod(int(alpha.argmin()), captioner.grid)
    peak = kept[row * cell + cell // 2, col * cell + cell // 2]
    assert peak > kept[low_row * cell + cell // 2, low_col * cell + cell // 2]


def test_the_figure_offered_is_the_one_caption_py_writes(captioner, trained_run, packed_data, images, tmp_path):
    result = captioner.caption(images["source"], 2)
    offered = captioner.figure(result)
    assert result.objects and offered.name == f"{images['source'].stem}_attention.png"
    caption.main(["--img", str(images["source"]), "--checkpoint", str(trained_run / "best.pt"), "--beam-size", "2",
                  "--out", str(tmp_path / "fig.png"), "--data-folder", str(packed_data)])
    written = (tmp_path / "fig.png").read_bytes()
    assert written[:8] == b"\x89PNG\r\n\x1a\n" and offered.read_bytes() == written


@pytest.mark.page
def test_the_page_handler_shows_a_message_and_clears_the_results_for_bad_input(captioner, bad_files, images,
                                                                                tmp_path):
    gr = pytest.importorskip("gradio", reason=APP_INSTALL)
    new_photo, caption_fn, show_word, figure = app.page_handlers(gr, captioner, max_beam_size=10)
    first, last = new_photo(str(images["copy"]), 3)  # the preview at once, then the caption
    assert first[0].startswith("Captioning my_photo.jpg") and first[1] == "" and first[5] is None
    assert first[7].shape == (app.DISPLAY_SIDE, app.DISPLAY_SIDE, 3) and first[8:] == (str(images["copy"]), None)
    assert last[1] == caption_fn(str(images["copy"]), 3)[1] != ""
    skipped = [*new_photo(None, 3), caption_fn(None, 3)]  # the chooser emptied: what the page shows stays
    assert all(isinstance(update, dict) and update.get("__type__") == "update" and len(update) == 1
               for updates in skipped for update in updates), skipped
    status, text, words, view, label, state, _ = caption_fn(str(images["copy"]), 3)
    assert text == state.caption and view.shape[-1] == 3 and "word 1 of" in label
    assert show_word(1, state)[1].startswith("Where the model looked for word 2")
    assert Path(figure(state)).is_file()
    for name, data in bad_files.items():
        (tmp_path / name).write_bytes(data)
        status, text, words, view, label, state, _ = caption_fn(str(tmp_path / name), 3)
        assert status.startswith(f"{name}: ") and text == "" and view is None and state is None
    assert "between 1 and 10" in caption_fn(str(images["copy"]), 11)[0]
    assert "0 or more" in caption_fn(str(images["copy"]), 3, -1.0)[0]
    assert "one of argmax, expectation" in caption_fn(str(images["copy"]), 3, 0.0, "sample")[0]
    assert show_word(0, None) == (None, "") and figure(None) is None

# ----------------------------------------------------------------------------------------------
# The served page: one command starts it; several users at once; a real browser


@pytest.fixture(scope="module")
def server(trained_run, packed_data):
    """`python app.py --checkpoint ... --data-folder ...` on a free port; yields the address it printed."""
    pytest.importorskip("gradio", reason=APP_INSTALL)
    with bench_app.serving(trained_run / "best.pt", packed_data) as (address, _):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", address)
        yield address


@pytest.mark.page
def test_four_users_at_once_each_get_their_own_caption(server, captioner, images):
    from gradio_client import Client, handle_file

    kinds = ["copy", "other", "cmyk", "16bit"]
    expected = {kind: captioner.caption(images[kind], 3) for kind in kinds}

    def one_user(kind):
        client = Client(server, verbose=False)
        status, text, *_ = client.predict(handle_file(str(images[kind])), 3, 0.0, "argmax", api_name="/caption")
        word_label = client.predict(1, api_name="/word")[1]
        return kind, status, text, word_label

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(one_user, kinds))
    for kind, status, text, word_label in answers:
        assert status.startswith(images[kind].name) and text == expected[kind].caption
        assert f"word 2 of {len(expected[kind].words)}: **{expected[kind].words[1]}**" in word_label


def browser_or_skip(playwright, profile):
    """Headless Debian Chromium with an empty profile, or a skip naming what to install."""
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium package: apt-get install chromium")
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True,
        viewport={"width": 1280, "height": 900})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A landscape (4:3) and a portrait (9:16) photo with visible structure: gradients, stripes, a disc."""
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name, (width, height) in {"landscape": (320, 240), "portrait": (180, 320)}.items():
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([255 * x / width, 128 + 100 * np.sin(y / 6.0), 255 * y / height], axis=-1)
        pixels[(x - width / 3) ** 2 + (y - height / 3) ** 2 < (min(width, height) / 5) ** 2] = (250, 240, 30)
        paths[name] = folder / f"{name}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(paths[name], quality=95)
    return paths


@pytest.mark.page
def test_a_browser_previews_photos_in_their_shape_and_takes_the_next_without_pressing_x(
        server, captioner, trained_run, photos, tmp_path, capsys):
    sync_api = pytest.importorskip("playwright.sync_api", reason=APP_INSTALL)
    requested = []
    with sync_api.sync_playwright() as playwright:
        browser = browser_or_skip(playwright, tmp_path / "profile")
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server)
            preview_src = overlay_src = None
            for name, aspect in (("landscape", 4 / 3), ("portrait", 9 / 16)):
                # The second photo goes into the same chooser, straight after the first: no x pressed.
                sync_api.expect(page.locator("#upload")).to_contain_text("Drop File Here", timeout=30_000)
                page.locator("#upload input[type=file]").set_input_files(str(photos[name]))
                preview, preview_src = shown_image(page, "#preview", aspect, preview_src)
                assert np.array_equal(preview.shape[:2], app.photo_preview(photos[name]).shape[:2])
                expected = caption_py_line(trained_run, photos[name], 3, capsys).split(": ", 1)[1]
                sync_api.expect(page.locator("#word-label")).to_contain_text("word 1 of", timeout=60_000)
                sync_api.expect(page.locator("#caption textarea")).to_have_value(expected)
                result = captioner.caption(photos[name], 3)
                # The overlay shown for each word is that word's map on the photo, in the photo's proportions.
                overlay, overlay_src = shown_image(page, "#attention", aspect, overlay_src)
                assert np.array_equal(overlay, app.attention_view(result, 0))
                page.locator("#words label").nth(1).click()
                sync_api.expect(page.locator("#word-label")).to_contain_text("word 2 of", timeout=30_000)
                overlay, overlay_src = shown_image(page, "#attention", aspect, overlay_src)
                assert np.array_equal(overlay, app.attention_view(result, 1))
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            (tmp_path / "notes.txt").write_text("a shopping list, not a photo\n")
            page.goto(server)  # a fresh page: a new user who picks the wrong file
            page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "notes.txt"))
            sync_api.expect(page.locator("#status")).to_contain_text("notes.txt: cannot decode image",
                                                                     timeout=30_000)
            sync_api.expect(page.locator("#caption textarea")).to_have_value("")
        finally:
            browser.close()
    # Offline: everything the page loaded came from the app itself (or from the page's own memory).
    outside = [url for url in requested if urlparse(url).scheme not in ("data", "blob")
               and urlparse(url).netloc != urlparse(server).netloc]
    assert requested and not outside, outside


def shown_image(page, element, aspect, previous):
    """(pixels, src) of the image the page shows in `element` once it is not `previous` (a src) and
    has loaded; asserts that it is drawn on the page in the proportions `aspect` (width / height), as
    its pixels are."""
    selector = f"{element} img"
    page.wait_for_function("([selector, previous]) => { const img = document.querySelector(selector); return img "
                           "&& img.complete && img.naturalWidth > 0 && img.getAttribute('src') !== previous; }",
                           arg=[selector, previous], timeout=60_000)
    image = page.locator(selector)
    src, box = image.get_attribute("src"), image.bounding_box()
    pixels = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx(aspect, rel=0.02)
    assert box["width"] / box["height"] == pytest.approx(aspect, rel=0.03), box
    return pixels, src
