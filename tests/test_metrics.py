"""Metrics against figures computed here by hand, by nltk directly or by the official COCO scorer:
eval.py's BLEU on its own captions file and every reference, eval.py's scores against COCOEvalCap's,
and the shapes set's content and grounding scores."""
import itertools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

import eval as evaluate_script
import make_shapes_dataset
from conftest import pack_args, packed_captions, write_karpathy
from datasets import reference_tokens
from metrics import box_cells, coco_caption_metrics, content_scores, grounding_scores


def test_eval_bleu_is_nltk_bleu_of_its_captions_against_every_reference(trained_run, packed_data, tmp_path):
    # last.pt: the tiny run's greedy validation BLEU-4 is 0 at both epochs, so best.pt is its first epoch.
    metrics = evaluate_script.main(["--checkpoint", str(trained_run / "last.pt"), "--data-folder", str(packed_data),
                                    "--beam-size", "3", "--workers", "0", "--no-coco-metrics",
                                    "--output-dir", str(tmp_path)])
    captions = json.loads((tmp_path / "captions_test_beam3.json").read_text())
    references = [m["references"] for m in json.loads((packed_data / "test_meta.json").read_text())["images"]]
    hypotheses = [c["caption"].split() for c in captions]
    assert len(hypotheses) == len(references) == metrics["images"]
    for n in (1, 4):
        expected = corpus_bleu(references, hypotheses, weights=(1.0 / n,) * n)
        assert metrics[f"bleu{n}"] == pytest.approx(expected, abs=1e-12)
    assert metrics["bleu1"] > 0.3  # the trained model's captions share words with the references


OBJECTS = [{"colour": "red", "shape": "circle", "bbox": [0.0, 0.0, 0.5, 0.5]},
           {"colour": "blue", "shape": "square", "bbox": [0.5, 0.5, 1.0, 1.0]}]


def test_content_scores_count_exact_matches_precision_and_recall():
    captions = [["a", "red", "circle", "and", "a", "blue", "square"],  # both objects: exact
                ["a", "red", "circle"],  # one of two: not exact, precise, half recalled
                ["a", "blue", "circle", "and", "a", "blue", "square"]]  # one wrong, one right
    scores = content_scores(captions, [OBJECTS, OBJECTS, OBJECTS])
    assert scores["content_accuracy"] == pytest.approx(1 / 3)
    assert scores["object_precision"] == pytest.approx((2 + 1 + 1) / (2 + 1 + 2))
    assert scores["object_recall"] == pytest.approx((2 + 1 + 1) / (2 + 2 + 2))


def test_box_cells_are_the_grid_cells_a_box_overlaps():
    # A 4x4 grid; a box from 0.25 to 0.75 in both directions covers the 2x2 middle cells, no more:
    # cells that only touch its edges are not inside it.
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:3, 1:3] = True
    assert (box_cells([0.25, 0.25, 0.75, 0.75], 4) == expected).all()
    # x runs along columns, y along rows.
    wide = box_cells([0.0, 0.0, 1.0, 0.2], 4)
    assert wide[0].all() and not wide[1:].any()


def test_grounding_hits_when_the_attention_peak_lies_on_the_named_object():
    grid = 2  # 4 cells: the red circle covers cell 0 (top left), the blue square cell 3 (bottom right)
    words = ["a", "red", "circle", "and", "a", "blue", "square"]
    looks = torch.full((len(words), grid * grid), 0.1)
    looks[2, 0] = 0.7  # "circle": peak on the circle's cell, a hit
    looks[6, 1] = 0.7  # "square": peak on cell 1, off the square, a miss
    looks[1, 0] = 0.7  # "red": a hit
    looks[5, 3] = 0.7  # "blue": a hit
    scores = grounding_scores([words], [looks], [OBJECTS], grid)
    assert scores["grounding_shape_words"] == 2 and scores["grounding_shape_hit_rate"] == 0.5
    assert scores["grounding_shape_chance"] == pytest.approx(0.25)
    assert scores["grounding_shape_ratio"] == pytest.approx(2.0)
    assert scores["grounding_colour_words"] == 2 and scores["grounding_colour_hit_rate"] == 1.0


def test_the_content_free_baseline_never_gives_an_image_its_own_captions():
    references = [[["caption", str(i)]] for i in range(7)]
    objects = [[{}] * (1 + i % 2) for i in range(7)]  # groups of 4 one-object and 3 two-object images
    baseline = evaluate_script.content_free_baseline(references, objects, seed=0)
    for i, caption in enumerate(baseline):
        donor = int(caption[1])
        assert donor != i and len(objects[donor]) == len(objects[i])


# ----------------------------------------------------------------------------------------------
# eval.py against the official COCO scorer, on images with 3, 5 and 7 reference captions

TEST_CAPTIONS = [
    ["A red circle beside a blue square.", "a red circle and a blue square", "Two shapes: a circle and a square."],
    ["A green triangle on the left.", "a small green triangle", "A triangle that is green.",
     "green triangle at the left side", "The triangle is green and small."],
    ["A big yellow star in the middle.", "a yellow star", "A star, yellow and big.", "one yellow star in the centre",
     "a large yellow star", "The star in the middle is yellow.", "yellow star on a white background"],
]
HYPOTHESES = [["a", "red", "circle", "and", "a", "green", "square"],
              ["a", "green", "triangle", "on", "the", "right", "side"],
              ["a", "big", "yellow", "star", "in", "the", "centre"]]


class NoSpice:
    """SPICE needs Stanford CoreNLP downloaded at first use, which cannot happen offline; every other
    scorer of COCOEvalCap runs as published."""

    def method(self):
        return "SPICE"

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


@pytest.mark.skipif(shutil.which("java") is None, reason="the official scorer's tokenizer and METEOR need Java")
def test_eval_scores_every_reference_once_as_the_official_coco_scorer_does(tmp_path, monkeypatch):
    from PIL import Image
    from pycocotools.coco import COCO
    import pycocoevalcap.eval as coco_eval

    import create_input_files

    entries = [(f"train{i}.png", "train", [" ".join(words)]) for i, words in enumerate(HYPOTHESES)]
    entries += [("val0.png", "val", ["a green triangle"])]
    entries += [(f"test{i}.png", "test", captions) for i, captions in enumerate(TEST_CAPTIONS)]
    for name, _, _ in entries:
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / name)
    data = tmp_path / "packed"
    create_input_files.main(pack_args(write_karpathy(tmp_path, entries), tmp_path, data, "--captions-per-image", "5"))
    word_map = json.loads((data / "word_map.json").read_text())

    def decode_split(encoder, decoder, dataset, word_map, *args, **kwargs):  # the captions to score
        tokens = [[word_map[w] for w in words] for words in HYPOTHESES]
        packed = [[list(map(word_map.get, w)) for w in refs] for refs in packed_captions(data, "test")[0]]
        return tokens, packed, [None] * len(tokens)

    monkeypatch.setattr(evaluate_script, "decode_split", decode_split)
    decoder = SimpleNamespace(attention_type="soft", output_layer="linear")  # what eval.py reports of the model
    metrics, captions = evaluate_script.evaluate(None, decoder, word_map, data, "test", 1, 20, 4, torch.device("cpu"),
                                                 show_progress=False)
    assert metrics["notes"] == []

    # The official way: the raw captions as a COCO annotation file, the results as eval.py writes them.
    meta = json.loads((data / "test_meta.json").read_text())["images"]
    annotations = {"images": [{"id": m["image_id"]} for m in meta], "type": "captions", "info": {}, "licenses": [],
                   "annotations": [{"image_id": m["image_id"], "id": 100 * k + j, "caption": c}
                                   for k, m in enumerate(meta) for j, c in enumerate(m["captions"])]}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "results.json").write_text(json.dumps(captions))
    coco = COCO(str(tmp_path / "annotations.json"))
    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    official = coco_eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "results.json")))
    official.evaluate()
    scores = official.eval

    assert [len(m["captions"]) for m in meta] == [3, 5, 7]
    for n in range(1, 5):  # nltk's and the official BLEU differ in rounding and smoothing only
        assert metrics[f"bleu{n}"] == pytest.approx(scores[f"Bleu_{n}"], abs=1e-3)
    assert metrics["meteor"] == scores["METEOR"]
    assert metrics["rougeL"] == scores["ROUGE_L"]
    assert metrics["cider"] == scores["CIDEr"]
    # Scoring against the 5 packed captions instead (what eval.py did before) gives other figures.
    packed_scores, _ = coco_caption_metrics(
        [[[w for w in c if w != "<unk>"] for c in refs] for refs in packed_captions(data, "test")[0]], HYPOTHESES)
    assert abs(packed_scores["cider"] - scores["CIDEr"]) > 1e-3


# ----------------------------------------------------------------------------------------------
# Content accuracy against every caption the shapes generator's grammar can write


class EveryChoice:
    """A stand-in for make_captions' random.Random: the templates from number `first` on (wrapping
    round), the objects named in `order`. Records how many templates there are."""

    def __init__(self, first, order):
        self.first, self.order, self.templates = first, order, 0

    def sample(self, population, k):
        if callable(population[0]):  # the templates of this object count
            self.templates = len(population)
            return [population[(self.first + j) % len(population)] for j in range(k)]
        return [population[i] for i in self.order]  # the objects, in the order to name them


def every_generated_caption(objects):
    """Every caption make_captions can write for `objects`: each template, naming them in each order."""
    captions = set()
    for order in itertools.permutations(range(len(objects))):
        first, templates = 0, 1
        while first < templates:  # 5 of the templates from `first` on: every one is picked at least once
            choice = EveryChoice(first, order)
            captions.update(make_shapes_dataset.make_captions(objects, choice))
            first, templates = first + 1, choice.templates
    return captions


def object_sets():
    """Every set of 1 to 3 objects the generator draws: distinct (colour, shape) pairs, in every size
    (for 3 objects, every set with the 8 size patterns taken in turn), at places that give relations."""
    pairs = list(itertools.product(make_shapes_dataset.COLOURS, make_shapes_dataset.SHAPES))
    boxes = [[4, 4, 20, 20], [40, 6, 56, 22], [10, 40, 26, 56]]
    sets = []
    for count in (1, 2, 3):
        size_patterns = list(itertools.product(make_shapes_dataset.SIZES, repeat=count))
        for n, chosen in enumerate(itertools.combinations(pairs, count)):
            patterns = size_patterns if count < 3 else [size_patterns[n % len(size_patterns)]]
            for sizes in patterns:
                sets.append([{"colour": c, "shape": s, "size": z, "bbox": b}
                             for (c, s), z, b in zip(chosen, sizes, boxes)])
    return sets


def test_every_caption_the_shapes_grammar_writes_counts_exactly_its_objects():
    captions, truth, one_missing, one_recoloured = [], [], [], []
    for objects in object_sets():
        unused = next(c for c in make_shapes_dataset.COLOURS if c not in {o["colour"] for o in objects})
        for caption in every_generated_caption(objects):
            captions.append(caption.split())
            truth.append(objects)
            one_missing.append(objects[1:])
            one_recoloured.append([{**objects[0], "colour": unused}] + objects[1:])
    assert len(captions) > 40_000 and {len(o) for o in truth} == {1, 2, 3}
    assert content_scores(captions, truth) == {"content_accuracy": 1.0, "object_precision": 1.0,
                                               "object_recall": 1.0}
    # The same captions judged against other objects: none of them is right any more.
    missing = content_scores(captions, one_missing)
    assert missing["content_accuracy"] == 0.0 and missing["object_recall"] == 1.0
    recoloured = content_scores(captions, one_recoloured)
    assert recoloured["content_accuracy"] == 0.0 and recoloured["object_precision"] < 1.0


# ----------------------------------------------------------------------------------------------
# The references eval.py scores against: every caption of an image, whatever training drops

TRAIN_CAPTIONS = ["a red circle above", "a blue square", "a green triangle to the left", "of a yellow diamond",
                  "one purple circle", "on a grey background"]
# Test images: a caption longer than --max-len 6; seven captions where 3 are packed; a word no
# training caption has (<unk> in the word map) and a caption of punctuation only (no words: dropped).
TEST_ENTRIES = [["a red circle", "a red circle above a blue square to the left of a green triangle"],
                ["a purple circle", "one purple circle", "a circle", "purple", "a purple shape", "one circle",
                 "a purple circle on a grey background"],
                ["a blue square", "a cerulean square", "..."]]


@pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")  # nltk, on the packed-only figure
def test_eval_scores_against_every_caption_of_an_image_not_only_those_trained_on(tmp_path, monkeypatch):
    from PIL import Image

    import create_input_files

    entries = [(f"train{i}.png", "train", [c]) for i, c in enumerate(TRAIN_CAPTIONS)]
    entries += [("val0.png", "val", ["a red circle"])]
    entries += [(f"test{i}.png", "test", captions) for i, captions in enumerate(TEST_ENTRIES)]
    for name, _, _ in entries:
        Image.new("RGB", (16, 16), (30, 30, 200)).save(tmp_path / name)
    data = tmp_path / "packed"
    create_input_files.main(pack_args(write_karpathy(tmp_path, entries), tmp_path, data, "--captions-per-image", "3",
                                      "--max-len", "6"))
    word_map = json.loads((data / "word_map.json").read_text())
    # The oracle: the captions as written, split into words, without the one that has none.
    expected_references = [[c.split() for c in captions if c != "..."] for captions in TEST_ENTRIES]
    hypotheses = [TEST_ENTRIES[0][1].split(), TEST_ENTRIES[1][6].split(), ["a", "blue", "square"]]

    def decode_split(encoder, decoder, dataset, word_map, *args, **kwargs):  # these captions, not a model's
        packed = [[list(map(word_map.get, w)) for w in refs] for refs in packed_captions(data, "test")[0]]
        return [[word_map[w] for w in words] for words in hypotheses], packed, [None] * len(hypotheses)

    monkeypatch.setattr(evaluate_script, "decode_split", decode_split)
    decoder = SimpleNamespace(attention_type="soft", output_layer="linear")
    metrics, _ = evaluate_script.evaluate(None, decoder, word_map, data, "test", 1, 20, 4, torch.device("cpu"),
                                          coco_metrics=False, show_progress=False)
    assert "cerulean" not in word_map and metrics["notes"] == []
    for n in range(1, 5):
        expected = corpus_bleu(expected_references, hypotheses, weights=(1.0 / n,) * n)
        assert metrics[f"bleu{n}"] == pytest.approx(expected, abs=1e-12)
    # Scored against the packed captions alone, the first two captions would find no reference equal to them.
    assert metrics["bleu4"] > corpus_bleu([[r for r in refs if len(r) <= 6][:3] for refs in expected_references],
                                          hypotheses) + 0.1


def test_references_from_packed_captions_are_their_words_without_start_end_or_padding():
    # Validation BLEU scores decoded captions (which hold no special tokens) against these: a <start>
    # or <end> left in every reference would lower BLEU for every model alike, and no error would say so.
    word_map = {"<pad>": 0, "a": 1, "red": 2, "circle": 3, "<unk>": 4, "<start>": 5, "<end>": 6}
    captions = torch.tensor([[5, 1, 2, 3, 6, 0, 0], [5, 4, 3, 6, 0, 0, 0]])  # (C, L), as packed
    lengths = torch.tensor([5, 4])  # <start> and <end> included, as packed
    assert reference_tokens(captions, lengths, word_map) == [[1, 2, 3], [4, 3]]
