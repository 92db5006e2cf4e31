"""Metrics against figures computed here by hand or by nltk directly: eval.py's BLEU on its own
captions file and the packed references, and the shapes set's content and grounding scores."""
import json

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

import eval as evaluate_script
from conftest import packed_captions
from metrics import box_cells, content_scores, grounding_scores


def test_eval_bleu_is_nltk_bleu_of_its_captions_against_the_packed_references(trained_run, packed_data, tmp_path):
    metrics = evaluate_script.main(["--checkpoint", str(trained_run / "best.pt"), "--data-folder", str(packed_data),
                                    "--beam-size", "3", "--workers", "0", "--no-coco-metrics",
                                    "--output-dir", str(tmp_path)])
    captions = json.loads((tmp_path / "captions_test_beam3.json").read_text())
    references, _ = packed_captions(packed_data, "test")
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
