"""Caption metrics: BLEU (nltk), METEOR, ROUGE-L and CIDEr (pycocoevalcap), the shapes set's content
and grounding scores, and a running average for training.

    from metrics import bleu_scores
    bleu_scores([[["a", "red", "circle"]]], [["a", "red", "circle"]])  # {"bleu1": 1.0, ...}
"""

import shutil
import warnings

import numpy as np


def bleu_scores(references, hypotheses):
    """Corpus BLEU-1..4 (nltk), each hypothesis against all references of its image.

    references: list over images of lists of token lists; hypotheses: list of token lists.
    """
    from nltk.translate.bleu_score import corpus_bleu

    weights = {1: (1.0,), 2: (0.5, 0.5), 3: (1 / 3,) * 3, 4: (0.25,) * 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when a short corpus has no 4-gram matches
        scores = {f"bleu{n}": float(corpus_bleu(references, hypotheses, weights=w)) for n, w in weights.items()}
    # Without smoothing, BLEU is 0 when some n-gram order has no match at all, but nltk puts the
    # smallest float (~1e-308) in that precision's place and returns its root: 1e-77 for one order
    # of four, 1e-231 for three (a real BLEU is never that small: even a brevity penalty of one word
    # against fifty is 5e-22). Write the 0 it stands for.
    return {name: (0.0 if score < 1e-50 else score) for name, score in scores.items()}


def coco_caption_metrics(references, hypotheses):
    """METEOR, ROUGE-L and CIDEr from pycocoevalcap, on already tokenised words.

    Returns (scores, notes): METEOR needs Java; without it, notes says so and the rest is reported.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h) if h else "<empty>"] for i, h in enumerate(hypotheses)}
    scores = {"rougeL": float(Rouge().compute_score(gts, res)[0]),
              "cider": float(Cider().compute_score(gts, res)[0])}
    notes = []
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            meteor.close() if hasattr(meteor, "close") else None
    else:
        notes.append("METEOR skipped: it needs Java (java not found on PATH)")
    return scores, notes


def mentioned_objects(words, colours, shapes):
    """(colour, shape) pairs a caption names: a shape word with a colour word right before it,
    or with one word (a size) between them. Returns a list of (colour, shape, index of shape word).
    """
    found = []
    for i, word in enumerate(words):
        if word in shapes:
            for j in (i - 1, i - 2):
                if j >= 0 and words[j] in colours:
                    found.append((words[j], word, i))
                    break
    return found


def content_scores(hypotheses, objects_per_image):
    """Whether captions name exactly the image's colour+shape objects.

    hypotheses: list of word lists; objects_per_image: list of lists of {"colour", "shape", ...}.
    Returns content accuracy (exact set match) and object precision and recall.
    """
    colours = {o["colour"] for objs in objects_per_image for o in objs}
    shapes = {o["shape"] for objs in objects_per_image for o in objs}
    exact = true_pos = predicted = actual = 0
    for words, objects in zip(hypotheses, objects_per_image):
        named = {(c, s) for c, s, _ in mentioned_objects(words, colours, shapes)}
        present = {(o["colour"], o["shape"]) for o in objects}
        exact += named == present
        true_pos += len(named & present)
        predicted += len(named)
        actual += len(present)
    n = max(len(hypotheses), 1)
    return {"content_accuracy": exact / n, "object_precision": true_pos / max(predicted, 1),
            "object_recall": true_pos / max(actual, 1)}


def box_cells(bbox, grid):
    """Boolean (grid, grid) mask of the encoder cells a normalised box [x0, y0, x1, y1] overlaps."""
    x0, y0, x1, y1 = bbox
    edges = np.arange(grid + 1) / grid
    cols = (edges[:-1] < x1) & (edges[1:] > x0)
    rows = (edges[:-1] < y1) & (edges[1:] > y0)
    return rows[:, None] & cols[None, :]


def grounding_scores(hypotheses, alphas, objects_per_image, grid):
    """Does attention land on the object a word names?

    For each generated shape word (and, separately, colour word) that names an object present in
    the image, a hit is the argmax cell of that step's attention map lying on the object's box
    (mapped to the encoder grid); chance is the share of the grid the box covers.

    hypotheses: list of word lists; alphas: list of (len(words), P) tensors; objects_per_image:
    list of lists of {"colour", "shape", "bbox" (normalised x0, y0, x1, y1)}; grid: sqrt(P).
    """
    totals = {kind: {"hits": 0, "chance": 0.0, "count": 0} for kind in ("shape", "colour")}
    for words, alpha, objects in zip(hypotheses, alphas, objects_per_image):
        for t, word in enumerate(words):
            for kind in ("shape", "colour"):
                targets = [o for o in objects if o[kind] == word]
                if kind == "shape" and len(targets) > 1 and t > 0:
                    # Two objects of one shape: the colour word before it says which is meant.
                    targets = [o for o in targets if o["colour"] in words[max(0, t - 2):t]] or targets
                if not targets:
                    continue
                mask = np.zeros((grid, grid), dtype=bool)
                for o in targets:
                    mask |= box_cells(o["bbox"], grid)
                peak = int(alpha[t].argmax())
                totals[kind]["hits"] += bool(mask.flat[peak])
                totals[kind]["chance"] += mask.mean()
                totals[kind]["count"] += 1
    scores = {}
    for kind, tot in totals.items():
        count = max(tot["count"], 1)
        hit_rate, chance = tot["hits"] / count, tot["chance"] / count
        scores[f"grounding_{kind}_hit_rate"] = hit_rate
        scores[f"grounding_{kind}_chance"] = chance
        scores[f"grounding_{kind}_ratio"] = hit_rate / chance if chance > 0 else None
        scores[f"grounding_{kind}_words"] = tot["count"]
    return scores

# ----------------------------------------------------------------------------------------------
# Meters


class AverageMeter:
    """Running weighted average of a value."""

    def __init__(self):
        self.sum = 0.0
        self.count = 0

    def update(self, value, n=1):
        """Add `value` observed over `n` items."""
        self.sum += value * n
        self.count += n

    @property
    def avg(self):
        """The average so far (0 before any update)."""
        return self.sum / self.count if self.count else 0.0
