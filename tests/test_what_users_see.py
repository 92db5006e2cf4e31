"""What users see: caption.py's figure and the page's view show word i's own map, in the photo's own
proportions and orientation, attended part bright and the rest dimmed; captions cut off at --max-steps
say so; a tiny image gets one warning; decoding runs the tutorial's 51 steps by default.

The figure and the view are read back pixel by pixel, with a decoder whose attention at step t is
one-hot on a known cell off the diagonal, so that a map shifted by one word, transposed or drawn on a
square photo lands in the wrong place.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import app
import beam_search
import caption
import eval as evaluate_script
from checkpoints import build_models

REPO = Path(__file__).resolve().parent.parent
GRID = 4
CELLS = [(0, 2), (3, 1), (1, 3), (2, 0), (0, 1)]  # (row, col) that word t attends to: off the diagonal, all apart
WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "one": 4, "two": 5, "three": 6, "four": 7, "five": 8}
WORDS = ["one", "two", "three", "four", "five"]
BLUE = (40, 90, 230)  # a flat photo: its panels are found by their blue, text and background have none


class FlatEncoder(torch.nn.Module):
    """Features of nothing: the one-hot decoder does not read them."""
    encoded_size = GRID

    def forward(self, images):
        return images.new_zeros(images.shape[0], GRID * GRID, 8)  # (B, P, E)


class OneHotDecoder(torch.nn.Module):
    """Writes WORDS[t] at step t attending only to cell CELLS[t], then <end>; beam search drives it as
    it drives the real decoder (its step count rides in h)."""
    attention_type = "soft"
    hard_read = "argmax"

    def project_encoder(self, encoder_out):
        return encoder_out

    def init_hidden_state(self, encoder_out):
        zeros = encoder_out.new_zeros(encoder_out.shape[0], 1)  # (B, 1)
        return zeros, zeros.clone()

    def decode_step(self, encoder_out, encoder_proj, words, h, c):
        step = int(h[0, 0])
        logits = h.new_full((words.shape[0], len(WORD_MAP)), -20.0)  # (n, V)
        logits[:, WORD_MAP[WORDS[step]] if step < len(WORDS) else WORD_MAP["<end>"]] = 0.0
        alpha = h.new_zeros(words.shape[0], GRID * GRID)  # (n, P)
        row, col = CELLS[min(step, len(CELLS) - 1)]
        alpha[:, row * GRID + col] = 1.0
        return logits, h + 1, c, alpha

    def beam_search(self, *args, **kwargs):
        return beam_search.beam_search(self, *args, **kwargs)


def flat_photo(path, width, height):
    Image.new("RGB", (width, height), BLUE).save(path)
    return path


def busy_photo(path, width, height, seed=0):
    """A photo with visible structure: a gradient, stripes and noise, so that dimming shows everywhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 128 + 100 * np.sin(y / 7.0), 255 * y / height], axis=-1)
    pixels += rng.normal(0, 20, pixels.shape)
    Image.fromarray(np.clip(pixels, 20, 255).astype(np.uint8)).save(path)
    return path


def cell_means(view, grid=GRID):
    """(grid, grid) mean brightness of each cell's inner half of an (H, W, 3) view: the map is stretched
    over the whole view, so cell (r, c) covers rows r*H/grid.. and columns c*W/grid.."""
    height, width = view.shape[:2]
    means = np.zeros((grid, grid))
    for r in range(grid):
        for c in range(grid):
            top, left = (r + 0.25) * height / grid, (c + 0.25) * width / grid
            block = view[round(top):round(top + height / grid / 2), round(left):round(left + width / grid / 2)]
            means[r, c] = block.astype(float).mean()
    return means


def runs(flags):
    """[(start, stop)] of the runs of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def panels_of(figure):
    """The panels of a figure of a BLUE photo, in reading order: [(top, bottom, left, right)] of the
    regions where blue outweighs red (photo pixels, bright or dimmed; not text, not background)."""
    mask = figure[..., 2].astype(int) - figure[..., 0].astype(int) > 25  # (H, W)
    boxes = []
    for top, bottom in runs(mask.any(axis=1)):
        band = mask[top:bottom]
        for left, right in runs(band.any(axis=0)):
            rows = np.flatnonzero(band[:, left:right].any(axis=1))
            boxes.append((top + rows[0], top + rows[-1] + 1, left, right))
    return boxes


@pytest.fixture
def one_hot(monkeypatch):
    """The page's captioner with the one-hot decoder in place of a checkpoint's."""
    monkeypatch.setattr(app, "models_from_checkpoint",
                        lambda path, device: (FlatEncoder(), OneHotDecoder(), {"word_map": WORD_MAP, "image_size": 32}))
    return app.Captioner("one-hot.pt", torch.device("cpu"))

# ----------------------------------------------------------------------------------------------
# Word i's map, where it belongs (issue 28, class 6)


@pytest.mark.parametrize("width, height", [(160, 120), (90, 160)])  # 4:3 and 9:16
def test_panel_i_of_the_figure_shows_word_i_s_map_in_the_photo_s_proportions(width, height, tmp_path):
    path = flat_photo(tmp_path / "photo.png", width, height)
    words, alphas, photo = caption.caption_image(FlatEncoder(), OneHotDecoder(), WORD_MAP, path, 32, 3, 51,
                                                 torch.device("cpu"))
    assert words == WORDS and photo.shape[1] * width == photo.shape[2] * height
    figure = caption.attention_figure_array(photo, words, alphas, GRID)
    caption.attention_figure(photo, words, alphas, GRID, tmp_path / "figure.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "figure.png").convert("RGB")), figure)

    panels = panels_of(figure)
    assert len(panels) == len(words) + 1  # <image>, then one per word
    for i, (top, bottom, left, right) in enumerate(panels):
        assert (right - left) / (bottom - top) == pytest.approx(width / height, rel=0.04)
        means = cell_means(figure[top:bottom, left:right, 2:3])
        if i == 0:  # the photo itself, undimmed
            assert means.min() > 0.9 * BLUE[2]
            continue
        assert np.unravel_index(means.argmax(), means.shape) == CELLS[i - 1], f"panel of word {i}"
        assert means.max() > 2.5 * np.median(means)  # the rest dimmed, as in the paper's figures


@pytest.mark.parametrize("width, height", [(160, 120), (90, 160)])
def test_the_page_s_view_for_word_i_shows_word_i_s_map_in_the_photo_s_proportions(one_hot, width, height,
                                                                                   tmp_path):
    result = one_hot.caption(flat_photo(tmp_path / "photo.png", width, height), 3)
    assert result.words == WORDS
    for i in range(len(WORDS)):
        view = app.attention_view(result, i)
        assert view.shape == (round(caption.DISPLAY_SIDE * min(1, height / width)),
                              round(caption.DISPLAY_SIDE * min(1, width / height)), 3)
        means = cell_means(view[..., 2:3])
        assert np.unravel_index(means.argmax(), means.shape) == CELLS[i], f"view of word {i + 1}"


def test_the_attended_part_keeps_its_brightness_and_the_rest_is_dimmed_on_a_busy_photo(one_hot, tmp_path):
    result = one_hot.caption(busy_photo(tmp_path / "busy.png", 320, 240), 3)
    photo = result.pixels.transpose(1, 2, 0).astype(float)  # (H, W, 3)
    view = app.attention_view(result, 0).astype(float)
    ratio = cell_means(view) / cell_means(photo)  # (GRID, GRID): what each cell kept of the photo
    row, col = CELLS[0]
    assert ratio[row, col] > 0.8
    far = [(r, c) for r in range(GRID) for c in range(GRID) if abs(r - row) > 1 or abs(c - col) > 1]
    assert all(ratio[r, c] == pytest.approx(caption.DIM, abs=0.03) for r, c in far)


def test_a_hard_model_s_cell_is_lit_and_marked_where_the_photo_s_proportions_put_it(tmp_path):
    photo = np.full((3, 90, 160), 200, dtype=np.uint8)  # (3, H, W)
    alpha = torch.zeros(GRID * GRID)
    alpha[1 * GRID + 3] = 1.0  # row 1, column 3
    view = caption.attention_panel(photo, alpha, GRID, mark_cell=True)
    cyan = (view == (0, 255, 255)).all(axis=-1)
    rows, cols = np.flatnonzero(cyan.any(axis=1)), np.flatnonzero(cyan.any(axis=0))
    assert (rows[0], cols[0]) == pytest.approx((90 / GRID, 3 * 160 / GRID), abs=2)
    assert (rows[-1], cols[-1]) == pytest.approx((2 * 90 / GRID, 160), abs=2)
    assert view[80, 10].max() < 0.3 * 200  # far from the cell: dimmed

# ----------------------------------------------------------------------------------------------
# Captions cut off at --max-steps, and the tutorial's 51 steps


def tutorial_caption(decoder, encoder_out, start, end, k):
    """sgrvinod's caption.py beam search for one image (1, P, E), step for step: the k live sequences
    extend by their k best words, one that says <end> is set aside and k shrinks, and the loop stops
    when k is 0 or after the step at which `step > 50` (51 words). The best set-aside sequence wins.
    Where none ended the tutorial's max() of an empty list raises; the best sequence left is returned."""
    encoder_out = encoder_out.expand(k, -1, -1)  # (k, P, E)
    encoder_proj = decoder.project_encoder(encoder_out)  # (k, P, A)
    k_prev_words = torch.full((k, 1), start)  # (k, 1)
    seqs, top_k_scores = k_prev_words, torch.zeros(k, 1)  # (k, 1) each
    complete_seqs, complete_seqs_scores = [], []
    h, c = decoder.init_hidden_state(encoder_out)
    step = 1
    while True:
        scores, h, c, _ = decoder.decode_step(encoder_out, encoder_proj, k_prev_words.squeeze(1), h, c)
        scores = top_k_scores.expand_as(scores) + F.log_softmax(scores, dim=1)  # (s, V)
        if step == 1:
            top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)  # (s,)
        else:
            top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)  # (s,)
        prev_word_inds, next_word_inds = top_k_words // scores.shape[1], top_k_words % scores.shape[1]
        seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)  # (s, step + 1)
        incomplete_inds = [i for i, word in enumerate(next_word_inds.tolist()) if word != end]
        complete_inds = [i for i in range(len(next_word_inds)) if i not in incomplete_inds]
        complete_seqs.extend(seqs[complete_inds].tolist())
        complete_seqs_scores.extend(top_k_scores[complete_inds].tolist())
        k -= len(complete_inds)
        if k == 0:
            break
        seqs = seqs[incomplete_inds]
        rows = prev_word_inds[incomplete_inds]
        h, c, encoder_out, encoder_proj = h[rows], c[rows], encoder_out[rows], encoder_proj[rows]
        top_k_scores = top_k_scores[incomplete_inds].unsqueeze(1)
        k_prev_words = next_word_inds[incomplete_inds].unsqueeze(1)
        if step > 50:
            break
        step += 1
    if not complete_seqs:
        return seqs[int(top_k_scores.view(-1).argmax())].tolist()[1:]
    return complete_seqs[complete_seqs_scores.index(max(complete_seqs_scores))][1:-1]


def test_a_model_that_never_says_end_gets_the_tutorial_s_caption_by_default():
    torch.manual_seed(0)
    args = {"encoder_arch": "resnet18", "encoder_cut_after": "layer2", "encoded_size": 3, "attention_dim": 16,
            "embed_dim": 8, "decoder_dim": 16, "dropout": 0.5, "pretrained": False, "encoder_weights": None,
            "fine_tune_encoder": False}
    _, decoder = build_models(args, vocab_size=12)
    decoder.eval()
    start, end = 10, 11
    with torch.no_grad():
        decoder.fc.bias[end] = -1e4  # never <end>
        decoder.fc.weight.mul_(20)  # words that differ clearly from step to step
    features = torch.randn(3, 9, 128)  # (B, P, E)
    with torch.no_grad():
        tokens = decoder.beam_search(features, start, end, beam_size=3)  # the default max steps
        expected = [tutorial_caption(decoder, features[i:i + 1], start, end, 3) for i in range(3)]
        assert [len(e) for e in expected] == [51] * 3
        assert tokens == expected
        assert [len(t) for t in decoder.beam_search(features, start, end, beam_size=3, max_steps=50)] == [50] * 3
    assert all(beam_search.is_unfinished(t, beam_search.MAX_STEPS) for t in tokens)


def test_every_script_decodes_51_steps_by_default():
    assert beam_search.MAX_STEPS == 51
    assert caption.parse_args(["--img", "x", "--checkpoint", "y"]).max_steps == 51
    assert evaluate_script.parse_args(["--checkpoint", "y", "--data-folder", "z"]).max_steps == 51
    assert app.parse_args([]).max_steps == 51


@pytest.fixture(scope="module")
def endless_checkpoint(trained_run, tmp_path_factory):
    """The tiny trained model, made never to say <end>."""
    state = torch.load(trained_run / "best.pt", weights_only=True)
    state["decoder"]["fc.bias"][state["word_map"]["<end>"]] = -1e4
    path = tmp_path_factory.mktemp("endless") / "best.pt"
    torch.save(state, path)
    return path


def test_a_cut_off_caption_is_marked_in_caption_py_its_figure_and_the_page(endless_checkpoint, shapes_raw,
                                                                           tmp_path, capsys, monkeypatch):
    image = sorted((shapes_raw / "images").glob("*.jpg"))[0]
    drawn = []
    monkeypatch.setattr(caption, "attention_figure", lambda *a, **options: drawn.append(options))
    [(_, words)] = caption.main(["--img", str(image), "--checkpoint", str(endless_checkpoint), "--max-steps", "4",
                                 "--out", str(tmp_path / "f.png")])
    line = capsys.readouterr().out.splitlines()[0]
    assert len(words) == 4 and line == f"{image}: {' '.join(words)} ... (unfinished: stopped at 4 words)"
    assert drawn == [{"unfinished_at": 4}]
    page = app.Captioner(endless_checkpoint, torch.device("cpu"), max_steps=4).caption(image, 3)
    assert page.unfinished and f"{image}: {page.caption}" == line
    assert caption.caption_text(["a", "circle"], 4) == "a circle"  # a finished caption is left as it is


def test_eval_says_how_many_captions_were_cut_off(endless_checkpoint, packed_data, tmp_path, capsys):
    metrics = evaluate_script.main(["--checkpoint", str(endless_checkpoint), "--data-folder", str(packed_data),
                                    "--max-steps", "3", "--no-coco-metrics", "--output-dir", str(tmp_path),
                                    "--workers", "0", "--device", "cpu"])
    assert metrics["images"] > 0 and metrics["unfinished_captions"] == metrics["images"]
    assert f"note: {metrics['images']} of {metrics['images']} captions were unfinished" in capsys.readouterr().out
    captions = json.loads((tmp_path / "captions_test_beam3.json").read_text())
    assert all(len(c["caption"].split()) == 3 for c in captions)  # scored as decoded: no marker in the words

# ----------------------------------------------------------------------------------------------
# One rule for tiny images


def test_a_tiny_image_gets_the_same_warning_from_caption_py_and_the_page(trained_run, tmp_path, capsys):
    tiny = tmp_path / "one_pixel.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    caption.main(["--img", str(tiny), "--checkpoint", str(trained_run / "best.pt")])
    err = capsys.readouterr().err
    sentence = ("one_pixel.png is only 1x1 pixels; it was stretched to the model's input size, so the caption "
                "says little about it.")
    assert f"note: {sentence}" in err
    assert app.Captioner(trained_run / "best.pt", torch.device("cpu")).caption(tiny, 3).note == sentence
    Image.new("RGB", (caption.SMALL_IMAGE_SIDE, 40)).save(tmp_path / "enough.png")
    assert caption.small_image_note(tmp_path / "enough.png") == ""

# ----------------------------------------------------------------------------------------------
# What the page's requirements file says


def test_requirements_app_says_where_make_app_install_puts_them():
    makefile = (REPO / "Makefile").read_text()
    venv = re.search(r"^APP_VENV := (\S+)$", makefile, flags=re.MULTILINE).group(1)
    assert re.search(r"^\t\$\(APP_PY\) -m pip install .*-r requirements-app\.txt$", makefile, flags=re.MULTILINE)
    opening = " ".join(line.lstrip("# ") for line in (REPO / "requirements-app.txt").read_text().splitlines()
                       if line.startswith("#"))
    assert "`make app-install`" in opening and f"venv of their own, {venv}" in opening
    assert "moves Pillow in .venv back" not in opening  # it does only when installed into .venv by hand
