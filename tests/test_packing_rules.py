"""Packing's rules, checked on small datasets the tests write themselves: how many captions each image
keeps, which words enter the word map, which captions are too long, and the pixels a model sees."""
import json
from pathlib import Path

import torch
from PIL import Image

import create_input_files
from conftest import pack_args, packed_captions, write_karpathy
from datasets import CaptionDataset

# ImageNet's statistics, written out here rather than imported: what every torchvision model expects.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def pack(tmp_path, captions_per_image_list, *extra, colours=None):
    """Pack one solid 8x8 PNG per entry of `captions_per_image_list` (a list of caption lists), all in
    the training split but one image each for val and test. Returns the output folder."""
    entries = [(f"im{i}.png", "train", caps) for i, caps in enumerate(captions_per_image_list)]
    entries += [(f"im{len(entries)}.png", "val", ["val words"]), (f"im{len(entries) + 1}.png", "test", ["test words"])]
    for i, (name, _, _) in enumerate(entries):
        Image.new("RGB", (8, 8), (colours or {}).get(i, (10 * i % 256, 200, 30))).save(tmp_path / name)
    out = tmp_path / "packed"
    create_input_files.main(pack_args(write_karpathy(tmp_path, entries), tmp_path, out, *extra, size=8))
    return out


def test_every_image_keeps_exactly_captions_per_image_of_its_own_captions(tmp_path):
    own = [[f"image {i} says {w}" for w in ("one", "two", "three", "four", "five", "six", "seven")[:n]]
           for i, n in enumerate([1, 2, 3, 4, 5, 6, 7])]
    out = pack(tmp_path, own, "--captions-per-image", 5, "--min-word-freq", 1)
    groups, _ = packed_captions(out, "train")
    assert len(groups) == 7
    for captions, kept in zip(own, groups):
        texts = [" ".join(words) for words in kept]
        assert len(texts) == 5 and set(texts) <= set(captions)
        if len(captions) <= 5:  # fewer than required: every caption is used, some of them twice
            assert set(texts) == set(captions)
        else:  # more than required: 5 different ones
            assert len(set(texts)) == 5


def test_words_below_the_minimum_frequency_become_unk_and_the_rest_are_kept(tmp_path):
    # "twice" appears in 2 training captions, "once" in 1; val and test words never count.
    out = pack(tmp_path, [["a twice"], ["a twice"], ["a once"]], "--captions-per-image", 1, "--min-word-freq", 2)
    groups, word_map = packed_captions(out, "train")
    assert "twice" in word_map and "a" in word_map
    assert "once" not in word_map and "val" not in word_map and "test" not in word_map
    assert [g[0] for g in groups] == [["a", "twice"], ["a", "twice"], ["a", "<unk>"]]


def test_captions_longer_than_max_len_are_dropped_and_counted(tmp_path):
    out = pack(tmp_path, [["one two three four"], ["one two three four five", "one two"]],
               "--captions-per-image", 1, "--max-len", 4, "--min-word-freq", 1)
    groups, _ = packed_captions(out, "train")
    assert [g[0] for g in groups] == [["one", "two", "three", "four"], ["one", "two"]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dropped"]["long_captions"] == 1


def test_the_model_sees_imagenet_normalised_pixels_of_the_right_image_for_each_caption(tmp_path):
    colours = {0: (0, 128, 255), 1: (255, 0, 64), 2: (30, 60, 90)}
    out = pack(tmp_path, [["first"], ["second", "second again"], ["third"]], "--captions-per-image", 2,
               "--min-word-freq", 1, colours=colours)
    dataset = CaptionDataset(out, "train")
    assert len(dataset) == 6
    word_map = json.loads((out / "word_map.json").read_text())
    for i in range(len(dataset)):
        image, caption, length = dataset[i]
        owner = i // 2  # captions are stored image by image, 2 per image here
        expected = torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(colours[owner], MEAN, STD)])
        torch.testing.assert_close(image, expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-5, rtol=0)
        first_word = caption[1].item()
        assert first_word == word_map[["first", "second", "third"][owner]]
        assert length.item() >= 3


def test_meta_file_holds_one_image_a_line_in_packing_order_and_reads_back_whole(tmp_path):
    out = pack(tmp_path, [["a dog é"], ["a cat"], ["a cow"]], "--captions-per-image", 1, "--min-word-freq", 1)
    text = (out / "train_meta.json").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == '{"images": [' and lines[-1] == "]}" and len(lines) == 3 + 2
    entries = [json.loads(line.rstrip(",")) for line in lines[1:-1]]
    assert [Path(e["file"]).name for e in entries] == ["im0.png", "im1.png", "im2.png"]
    assert entries[0]["captions"] == ["a dog é"] and "é" in lines[1]  # written as UTF-8, not \u escapes
    assert json.loads(text) == {"images": entries}
    assert json.loads((out / "val_meta.json").read_text())["images"][0]["references"] == [["val", "words"]]
