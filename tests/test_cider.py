"""cider.py's CIDEr-D against pycocoevalcap's Cider, and the properties a reward needs."""
import pytest
from pycocoevalcap.cider.cider import Cider

from cider import CiderD, document_frequencies, ngram_counts, split_references


def varied_hypotheses(references):
    """Captions of every kind for the images of `references`: exact copies of a reference, other
    images' captions, cut ones, repeated words (which clipping must not reward), one-word ones."""
    hypotheses = []
    for i, refs in enumerate(references):
        other = references[(i + 1) % len(references)][0]
        kind = i % 5
        hypotheses.append([refs[0], other, refs[1][:4], refs[0][:3] * 3, refs[2][-1:]][kind])
    return hypotheses


def test_corpus_score_equals_pycocoevalcap_with_the_same_document_frequencies(packed_data):
    references = split_references(packed_data, "test")
    hypotheses = varied_hypotheses(references)
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    expected_corpus, expected_each = Cider().compute_score(gts, res)
    # pycocoevalcap counts document frequencies on the references it scores: give ours the same ones.
    scorer = CiderD.from_references(references)
    assert scorer.corpus_score(hypotheses, references) == pytest.approx(float(expected_corpus), abs=1e-6)
    assert scorer.scores(hypotheses, references) == pytest.approx(list(expected_each), abs=1e-6)
    assert 0.5 < float(expected_corpus) < 9.0  # neither all perfect nor all zero: the cases differ


def test_training_document_frequencies_survive_a_checkpoint_and_change_the_score(packed_data):
    train_refs, test_refs = split_references(packed_data, "train"), split_references(packed_data, "test")
    scorer = CiderD.from_references(train_refs)
    restored = CiderD.from_state_dict(scorer.state_dict())
    hypotheses = varied_hypotheses(test_refs)
    assert restored.scores(hypotheses, test_refs) == scorer.scores(hypotheses, test_refs)
    assert scorer.corpus_score(hypotheses, test_refs) != CiderD.from_references(test_refs).corpus_score(
        hypotheses, test_refs)


def test_a_better_caption_scores_higher_and_repeats_earn_nothing():
    references = [[["a", "red", "circle", "above", "a", "blue", "square"],
                   ["a", "blue", "square", "below", "a", "red", "circle"]],
                  [["a", "green", "triangle"], ["one", "green", "triangle"]]]
    scorer = CiderD.from_references(references)
    exact, partial, wrong = (["a", "red", "circle", "above", "a", "blue", "square"], ["a", "red", "circle"],
                             ["a", "green", "triangle"])
    scores = [scorer.score(h, references[0]) for h in (exact, partial, wrong)]
    assert scores[0] > scores[1] > scores[2] >= 0.0
    # "red red red ...": clipped to the reference's counts, and longer than them.
    assert scorer.score(["red"] * 7, references[0]) < scorer.score(["red"], references[0]) + 1e-9
    assert scorer.score([], references[0]) == 0.0


def test_closest_pays_every_phrasing_of_the_references_in_full():
    # Two of three references state sizes: the mean over them pays more for that phrasing, the closest
    # reference pays both phrasings alike (what scst.py --reward-against closest rewards).
    sized, plain = ["a", "small", "red", "circle", "and", "a", "large", "blue", "square"], \
        ["a", "red", "circle", "and", "a", "blue", "square"]
    references = [[sized, ["a", "large", "blue", "square", "and", "a", "small", "red", "circle"], plain],
                  [["a", "green", "triangle", "and", "a", "red", "diamond"]]]
    scorer = CiderD.from_references(references)
    assert scorer.score(sized, references[0]) > scorer.score(plain, references[0])
    assert scorer.score(sized, references[0], closest=True) == pytest.approx(10.0)
    assert scorer.score(plain, references[0], closest=True) == pytest.approx(10.0)
    # The closest reference's score is the largest of the scores against each reference alone.
    partial = ["a", "red", "circle", "and", "a", "square"]
    assert scorer.score(partial, references[0], closest=True) == pytest.approx(
        max(scorer.score(partial, [ref]) for ref in references[0]))
    assert scorer.corpus_score([partial], references[:1], closest=True) == scorer.score(partial, references[0], True)


def test_document_frequencies_count_images_not_captions():
    df = document_frequencies([[["a", "cat"], ["a", "cat"]], [["a", "dog"]]])
    assert df[("a",)] == 2 and df[("cat",)] == 1 and df[("a", "cat")] == 1
    assert ngram_counts(["a", "a", "a"]) == {("a",): 3, ("a", "a"): 2, ("a", "a", "a"): 1}


def test_images_sharing_some_references_each_get_their_own_score_as_pycocoevalcap_gives():
    # The reference vectors are cached per image: images whose reference sets overlap (the same first
    # caption, a subset, one caption repeated) must still be scored against their own whole set,
    # whichever of them is scored first. Images 0 to 4 get the same caption, so only their references
    # make their scores differ.
    first, second = "a red circle above a blue square", "a blue square below a red circle"
    reference_sets = [[first, second, "two shapes on grey"],
                      [first, second],
                      [second, first, "two shapes on grey"],
                      [first, second, second],
                      [first, "a small red circle", "a circle and a square"],
                      ["a green triangle", "a yellow diamond"],
                      ["a purple square", "a large purple square"],
                      ["a small green diamond", "a yellow circle"]]
    references = [[r.split() for r in refs] for refs in reference_sets]
    hypotheses = [first.split()] * 5 + [c.split() for c in ("a green diamond", "a purple square", "a yellow circle")]
    gts = {i: refs for i, refs in enumerate(reference_sets)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    expected_corpus, expected_each = Cider().compute_score(gts, res)
    for order in (list(range(8)), list(range(8))[::-1]):  # the cache filled from either end
        scorer = CiderD.from_references(references)
        each = {i: scorer.score(hypotheses[i], references[i]) for i in order}
        assert [each[i] for i in range(8)] == pytest.approx(list(expected_each), abs=1e-6)
    assert scorer.corpus_score(hypotheses, references) == pytest.approx(float(expected_corpus), abs=1e-6)
    assert len({round(float(expected_each[i]), 6) for i in (0, 1, 3, 4)}) == 4  # the sets' scores differ
