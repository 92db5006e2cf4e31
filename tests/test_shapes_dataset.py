"""Tests for make_shapes_dataset.py: determinism, layouts, the caption rule, splits and the pixels."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import make_shapes_dataset as shapes

RELATIONS = ("to the left of", "to the right of", "above", "below")


def read_folder(folder):
    """Return the JSON text and {filename: bytes} of every image of a generated dataset."""
    with open(os.path.join(folder, "dataset_shapes.json")) as f:
        text = f.read()
    image_folder = os.path.join(folder, "images")
    images = {}
    for name in sorted(os.listdir(image_folder)):
        with open(os.path.join(image_folder, name), "rb") as f:
            images[name] = f.read()
    return text, images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 120-image dataset generated once through the command line entry point."""
    folder = tmp_path_factory.mktemp("shapes")
    json_path = shapes.main(["--output-folder", str(folder), "--num-images", "120", "--seed", "3"])
    with open(json_path) as f:
        data = json.load(f)
    return folder, data


def parse_mentions(tokens):
    """Return [(position, colour, shape, size or None)] for every shape noun, asserting the caption rule."""
    mentions = []
    for position, token in enumerate(tokens):
        assert token not in {shape + "s" for shape in shapes.SHAPES}, f"plural in {tokens}"
        if token in shapes.COLOURS:
            assert position + 1 < len(tokens) and tokens[position + 1] in shapes.SHAPES, \
                f"colour not followed by a shape in {tokens}"
        if token in shapes.SHAPES:
            assert position >= 1 and tokens[position - 1] in shapes.COLOURS, \
                f"shape without a colour right before it in {tokens}"
            size = tokens[position - 2] if position >= 2 and tokens[position - 2] in shapes.SIZES else None
            mentions.append((position, tokens[position - 1], token, size))
        if token in shapes.SIZES:
            assert tokens[position + 1] in shapes.COLOURS, f"size word not followed by a colour in {tokens}"
    return mentions


def expected_relation(box_a, box_b):
    """Where A is relative to B by the dominant axis of the centre offset (independent of the module)."""
    dx = (box_a[0] + box_a[2]) / 2 - (box_b[0] + box_b[2]) / 2
    dy = (box_a[1] + box_a[3]) / 2 - (box_b[1] + box_b[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        shapes.main(["--output-folder", str(tmp_path / name), "--num-images", "12", "--seed", str(seed)])
        runs[name] = read_folder(tmp_path / name)
    assert runs["a"][0] == runs["b"][0]
    assert runs["a"][1] == runs["b"][1]
    assert len(runs["a"][1]) == 12
    assert runs["a"][0] != runs["c"][0]
    assert runs["a"][1] != runs["c"][1]


def test_running_twice_into_one_folder_gives_the_same_dataset(tmp_path):
    shapes.main(["--output-folder", str(tmp_path), "--num-images", "8"])
    first = read_folder(tmp_path)
    shapes.main(["--output-folder", str(tmp_path), "--num-images", "8"])
    assert read_folder(tmp_path) == first
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_karpathy_format(dataset):
    folder, data = dataset
    assert data["dataset"] == "shapes"
    assert [image["imgid"] for image in data["images"]] == list(range(120))
    sentids = []
    for image in data["images"]:
        assert os.path.isfile(os.path.join(folder, image["filepath"], image["filename"]))
        assert image["sentids"] == [sentence["sentid"] for sentence in image["sentences"]]
        assert all(sentence["imgid"] == image["imgid"] for sentence in image["sentences"])
        assert all(sentence["tokens"] == sentence["raw"].split() for sentence in image["sentences"])
        assert (image["width"], image["height"]) == (128, 128)
        sentids += image["sentids"]
    assert len(set(sentids)) == len(sentids)


def test_objects_are_inside_distinct_and_do_not_overlap(dataset):
    _, data = dataset
    counts = set()
    for image in data["images"]:
        objects = image["objects"]
        counts.add(len(objects))
        assert 1 <= len(objects) <= 3
        pairs = [(obj["colour"], obj["shape"]) for obj in objects]
        assert len(set(pairs)) == len(pairs)
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= image["width"] and 0 <= y0 < y1 <= image["height"]
            assert obj["shape"] in shapes.SHAPES and obj["colour"] in shapes.COLOURS
            assert obj["size"] in shapes.SIZES
            side = x1 - x0
            assert (18 <= side <= 26) if obj["size"] == "small" else (36 <= side <= 48)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                ax0, ay0, ax1, ay1 = a["bbox"]
                bx0, by0, bx1, by1 = b["bbox"]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"overlap in {image['filename']}"
    assert counts == {1, 2, 3}


def test_captions_follow_the_rule_and_name_exactly_the_objects(dataset):
    _, data = dataset
    for image in data["images"]:
        assert len(image["sentences"]) == 5
        objects = {(obj["colour"], obj["shape"]): obj for obj in image["objects"]}
        raws = [sentence["raw"] for sentence in image["sentences"]]
        assert len(set(raws)) == 5
        for sentence in image["sentences"]:
            assert sentence["raw"] == sentence["raw"].lower()
            mentions = parse_mentions(sentence["tokens"])
            named = {(colour, shape) for _, colour, shape, _ in mentions}
            assert named == set(objects), f"{sentence['raw']} vs {sorted(objects)}"
            for _, colour, shape, size in mentions:
                assert size is None or size == objects[(colour, shape)]["size"], sentence["raw"]


def test_spatial_relations_match_the_boxes(dataset):
    _, data = dataset
    checked = 0
    for image in data["images"]:
        boxes = {(obj["colour"], obj["shape"]): obj["bbox"] for obj in image["objects"]}
        for sentence in image["sentences"]:
            raw, tokens = sentence["raw"], sentence["tokens"]
            mentions = parse_mentions(tokens)
            for relation in RELATIONS:
                if f" {relation} " not in f" {raw} ":
                    continue
                # The relation sits between the mention before it (subject) and the one after it (object).
                start = len(raw[:raw.index(f" {relation} ")].split())
                before = [m for m in mentions if m[0] < start][-1]
                after = [m for m in mentions if m[0] > start][0]
                subject, reference = boxes[before[1:3]], boxes[after[1:3]]
                assert expected_relation(subject, reference) == relation, raw
                checked += 1
    assert checked > 50


def test_splits_cover_train_val_and_test(dataset):
    _, data = dataset
    splits = [image["split"] for image in data["images"]]
    assert set(splits) == {"train", "val", "test"}
    assert splits.count("val") == 12 and splits.count("test") == 12


@pytest.mark.parametrize("num_images", [3, 5])
def test_tiny_datasets_still_have_val_and_test(num_images):
    import random
    splits = shapes.assign_splits(num_images, 0.1, 0.1, random.Random(0))
    assert splits.count("val") == 1 and splits.count("test") == 1 and splits.count("train") == num_images - 2


def test_pixels_at_box_centres_have_the_object_colour(dataset):
    folder, data = dataset
    for image in data["images"][:40]:
        pixels = np.asarray(Image.open(os.path.join(folder, image["filepath"], image["filename"])).convert("RGB"))
        assert pixels.shape == (128, 128, 3)
        for obj in image["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)  # 3x3 around the centre
            distances = {colour: np.abs(patch - rgb).max() for colour, rgb in shapes.COLOUR_RGB.items()}
            assert min(distances, key=distances.get) == obj["colour"], image["filename"]
            assert distances[obj["colour"]] < 40, (image["filename"], obj, patch)


def test_image_size_scales_the_objects(tmp_path):
    json_path = shapes.main(["--output-folder", str(tmp_path), "--num-images", "10", "--image-size", "64"])
    with open(json_path) as f:
        data = json.load(f)
    for image in data["images"]:
        assert Image.open(os.path.join(tmp_path, "images", image["filename"])).size == (64, 64)
        for obj in image["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert x1 - x0 == y1 - y0 and x1 <= 64 and y1 <= 64
            assert (9 <= x1 - x0 <= 13) if obj["size"] == "small" else (18 <= x1 - x0 <= 24)
