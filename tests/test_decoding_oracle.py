"""Decoding checked against oracles that share none of its code: every caption a tiny model can
produce, each scored by the teacher-forced pass, and the best one found by enumerating them all (with
and without a length penalty); the tutorial's plain one-image search for narrow beams; and a decoder
whose word probabilities are written out, with the answer worked out by hand."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from beam_search import beam_search
from models import DecoderWithAttention
from test_decoding import tutorial_beam_search

# <pad> 0, two words 1 and 2, <start> 3, <end> 4: every token is a word the search may pick.
VOCAB, START, END = 5, 3, 4
MAX_STEPS = 4
NUM_IMAGES = 6


def tiny_model(seed):
    """A random decoder over VOCAB tokens and NUM_IMAGES feature maps of 3 pixels. Its weights are
    scaled up so that word probabilities are peaked and depend on the words before: the best captions
    then end at different lengths, and beams narrower than the whole tree miss some of them."""
    torch.manual_seed(seed)
    decoder = DecoderWithAttention(vocab_size=VOCAB, encoder_dim=6, attention_dim=4, embed_dim=3,
                                   decoder_dim=8, dropout=0.0).eval()
    with torch.no_grad():
        decoder.embedding.weight.mul_(30.0)
        decoder.lstm.weight_ih.mul_(3.0)
        decoder.lstm.weight_hh.mul_(3.0)
        decoder.fc.weight.mul_(50.0)
        decoder.fc.bias[END] = -2.0
    return decoder, torch.randn(NUM_IMAGES, 3, 6) * 2


def every_caption(max_steps):
    """[(words, finished)]: every finished caption (at most max_steps - 1 words, then <end>) and every
    unfinished one (max_steps words, none of them <end>)."""
    words = [w for w in range(VOCAB) if w != END]
    finished = [(list(seq), True) for n in range(max_steps) for seq in itertools.product(words, repeat=n)]
    unfinished = [(list(seq), False) for seq in itertools.product(words, repeat=max_steps)]
    return finished + unfinished


def teacher_forced_log_prob(decoder, features, captions):
    """Summed log-probability of each (words, finished) caption of one image (features (1, P, E)),
    <end> included for a finished one, from the teacher-forced forward pass. Returns (N,)."""
    tokens = [[START] + words + ([END] if finished else []) for words, finished in captions]
    lengths = torch.tensor([len(t) for t in tokens])
    padded = torch.zeros(len(tokens), int(lengths.max()), dtype=torch.long)
    for i, t in enumerate(tokens):
        padded[i, :len(t)] = torch.tensor(t)
    with torch.no_grad():
        scores, _, decode_lengths = decoder(features.expand(len(tokens), -1, -1), padded, lengths)
    log_probs = F.log_softmax(scores, dim=2).gather(2, padded[:, 1:scores.shape[1] + 1].unsqueeze(2)).squeeze(2)
    real = torch.arange(scores.shape[1]).unsqueeze(0) < decode_lengths.unsqueeze(1)  # (N, T)
    return (log_probs * real).sum(dim=1)


def assert_maps_are_the_teacher_forced_ones(decoder, features, tokens, alphas):
    """Each returned word's attention map is the one the teacher-forced pass gives that word, for
    every image of the batch (features (N, P, E), tokens and alphas as beam_search returns them)."""
    for i, (words, maps) in enumerate(zip(tokens, alphas)):
        full = [START] + words + ([END] if len(words) < MAX_STEPS else [])
        with torch.no_grad():
            _, teacher_alphas, _ = decoder(features[i:i + 1], torch.tensor([full]), torch.tensor([len(full)]))
        torch.testing.assert_close(maps, teacher_alphas[0, :len(words)])


def oracle_best_finished(decoder, features, length_penalty=0.0):
    """The best finished caption of each image by exhaustive search: [(words, log-probability)]. With
    a length penalty alpha, "best" ranks by log p / ((5 + |y|) / 6) ** alpha (Wu et al. 2016), |y| the
    words scored: the caption's words and its <end>."""
    captions = [c for c in every_caption(MAX_STEPS) if c[1]]
    scored_lengths = torch.tensor([len(words) + 1 for words, _ in captions], dtype=torch.float)
    best = []
    for i in range(features.shape[0]):
        log_probs = teacher_forced_log_prob(decoder, features[i:i + 1], captions)
        top = int((log_probs / ((5 + scored_lengths) / 6) ** length_penalty).argmax())
        best.append((captions[top][0], float(log_probs[top])))
    return best


def beam_holding_every_hypothesis():
    """A beam size at which no caption is ever pushed out: every hypothesis of the last step fits."""
    return len(every_caption(MAX_STEPS))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_beam_search_wide_enough_for_every_caption_returns_the_best_finished_one(seed):
    decoder, features = tiny_model(seed)
    expected = oracle_best_finished(decoder, features)
    tokens, alphas, scores = decoder.beam_search(features, START, END, beam_size=beam_holding_every_hypothesis(),
                                                 max_steps=MAX_STEPS, return_alphas=True, return_scores=True)
    assert tokens == [words for words, _ in expected]
    for score, (_, log_prob) in zip(scores, expected):
        assert score == pytest.approx(log_prob, abs=1e-4)
    assert len({len(t) for t in tokens}) > 1  # the best captions end at different steps
    # The winners finished in beams far from the first (of the 341 ranked at their step, many score higher).
    assert_maps_are_the_teacher_forced_ones(decoder, features, tokens, alphas)


@pytest.mark.parametrize("length_penalty", [0.7, 1.3])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_with_a_length_penalty_the_best_ranked_caption_comes_back_with_its_log_probability(seed, length_penalty):
    decoder, features = tiny_model(seed)
    expected = oracle_best_finished(decoder, features, length_penalty)
    tokens, alphas, scores = decoder.beam_search(features, START, END, beam_size=beam_holding_every_hypothesis(),
                                                 max_steps=MAX_STEPS, return_alphas=True, return_scores=True,
                                                 length_penalty=length_penalty)
    assert tokens == [words for words, _ in expected]
    # The score handed back is the caption's log-probability, not the penalised figure that ranked it.
    for score, (_, log_prob) in zip(scores, expected):
        assert score == pytest.approx(log_prob, abs=1e-4)
    assert_maps_are_the_teacher_forced_ones(decoder, features, tokens, alphas)


@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 1.3])
@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_narrow_beams_return_the_tutorials_caption(beam_size, length_penalty):
    # Beams narrower than the tree: finished captions leave the beam and free their places, and never
    # extend, as in the tutorial's plain one-image search (test_decoding.tutorial_beam_search).
    compared = 0
    for seed in range(8):
        decoder, features = tiny_model(seed)
        tokens = decoder.beam_search(features, START, END, beam_size=beam_size, max_steps=MAX_STEPS,
                                     length_penalty=length_penalty)
        for i, words in enumerate(tokens):
            with torch.no_grad():
                expected = tutorial_beam_search(decoder, features[i:i + 1], START, END, beam_size, MAX_STEPS,
                                                length_penalty)
            if expected is not None:  # where the tutorial's search finished a caption
                assert words == expected, (seed, i)
                compared += 1
    assert compared >= NUM_IMAGES  # narrow beams often finish nothing in 4 steps


def test_the_length_penalty_changes_which_caption_is_best():
    # What gives the test above its power: over its seeds, each alpha picks other captions for some images.
    def picks(rule):
        return [rule(*tiny_model(seed)) for seed in range(4)]

    alpha0, alpha07, alpha13 = (picks(lambda d, f, a=a: oracle_best_finished(d, f, a)) for a in (0.0, 0.7, 1.3))
    assert alpha0 != alpha07 and alpha07 != alpha13 and alpha0 != alpha13


@pytest.mark.parametrize("length_penalty", [0.0, 1.3])
@pytest.mark.parametrize("beam_size", [1, 2, 3, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_returned_score_is_the_teacher_forced_log_probability_of_its_caption(seed, beam_size, length_penalty):
    decoder, features = tiny_model(seed)
    tokens, alphas, scores = decoder.beam_search(features, START, END, beam_size=beam_size, max_steps=MAX_STEPS,
                                                 return_alphas=True, return_scores=True,
                                                 length_penalty=length_penalty)
    best = oracle_best_finished(decoder, features)
    for i, (words, score) in enumerate(zip(tokens, scores)):
        assert END not in words and len(words) <= MAX_STEPS
        finished = len(words) < MAX_STEPS  # a finished caption spent one of its steps on <end>
        expected = teacher_forced_log_prob(decoder, features[i:i + 1], [(words, finished)])
        assert score == pytest.approx(float(expected), abs=1e-4)
        if finished:  # a finished caption can be no better than the best of them all
            assert score <= best[i][1] + 1e-4
        # Each word's attention map is the one the teacher-forced pass gives that word.
        full = [START] + words + ([END] if finished else [])
        with torch.no_grad():
            _, teacher_alphas, _ = decoder(features[i:i + 1], torch.tensor([full]), torch.tensor([len(full)]))
        torch.testing.assert_close(alphas[i], teacher_alphas[0, :len(words)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_decoding_takes_the_teacher_forced_best_word_at_every_step(seed):
    decoder, features = tiny_model(seed)
    tokens, scores = decoder.greedy_decode(features, START, END, max_steps=MAX_STEPS, return_scores=True)
    for i, words in enumerate(tokens):
        finished = len(words) < MAX_STEPS
        full = [START] + words + ([END] if finished else [])
        caption = torch.tensor([full])
        with torch.no_grad():
            step_scores, _, _ = decoder(features[i:i + 1], caption, torch.tensor([len(full)]))
        assert step_scores[0].argmax(dim=1).tolist() == full[1:]
        expected = teacher_forced_log_prob(decoder, features[i:i + 1], [(words, finished)])
        assert scores[i] == pytest.approx(float(expected), abs=1e-4)


class ScriptedDecoder:
    """A stand-in for DecoderWithAttention with the three methods beam search calls, whose next-word
    probabilities are written out per caption so far (`table`: {words after <start>: {word: p}},
    <end> with certainty for any other caption). Its state h carries the caption so far as a number."""

    def __init__(self, table):
        self.table = table

    def project_encoder(self, encoder_out):
        return encoder_out

    def init_hidden_state(self, encoder_out):
        zeros = encoder_out.new_zeros(encoder_out.shape[0], 1)  # (B, 1): no caption yet
        return zeros, zeros

    def decode_step(self, encoder_out, encoder_proj, words, h, c):
        h = h * VOCAB + words.unsqueeze(1)  # (B*K, 1): the caption so far, <start> first, in base VOCAB
        probs = torch.full((len(words), VOCAB), 1e-6)  # (B*K, V)
        for row, code in enumerate(h.squeeze(1).long().tolist()):
            caption = []
            while code:
                code, word = divmod(code, VOCAB)
                caption.insert(0, word)
            for word, p in self.table.get(tuple(caption[1:]), {END: 1.0}).items():
                probs[row, word] = p
        alpha = torch.full((len(words), encoder_out.shape[1]), 1.0 / encoder_out.shape[1])  # (B*K, P)
        return probs.log(), h, c, alpha


def test_a_finished_beam_never_extends():
    # Beam 2. Step 1: "<end>" (0.5) finishes the empty caption, "a" (0.45) goes on. Step 2: one place
    # is left: "a b" (0.4275) takes it, "a b <end>" then finishes. A finished beam that went on living
    # would take that place with "<end> a" (0.495) and lose "a b".
    a, b = 1, 2
    decoder = ScriptedDecoder({(): {END: 0.5, a: 0.45, b: 0.05}, (a,): {b: 0.95, END: 0.05},
                               (a, b): {END: 1.0}, (END,): {a: 0.99, END: 0.01}})
    features = torch.zeros(2, 3, 6)
    for length_penalty, words, probability in [(0.0, [], 0.5), (1.0, [a, b], 0.45 * 0.95)]:
        # At alpha 1, log 0.4275 / (8 / 6) = -0.637 ranks above log 0.5 / (6 / 6) = -0.693.
        tokens, scores = beam_search(decoder, features, START, END, beam_size=2, max_steps=MAX_STEPS,
                                     return_scores=True, length_penalty=length_penalty)
        assert tokens == [words, words]
        assert scores == pytest.approx([math.log(probability)] * 2, abs=1e-4)
