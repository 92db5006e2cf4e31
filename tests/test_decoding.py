"""Batched beam search against one image at a time, greedy decoding and its edge cases, on a trained
tiny model. The models run on --device (default cpu; `--device cuda` on a GPU machine)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import models
import checkpoints
from datasets import CaptionDataset

MAX_STEPS = 20


@pytest.fixture(scope="module")
def trained(trained_run, packed_data, device):
    """(decoder, features (N, P, E) of the val and test images, <start>, <end>) of the trained tiny model."""
    encoder, decoder, state = checkpoints.models_from_checkpoint(trained_run / "best.pt", device)
    images = []
    for split in ("val", "test"):
        dataset = CaptionDataset(packed_data, split)
        images += [dataset[i][0] for i in range(len(dataset))]
    with torch.no_grad():
        features = encoder(torch.stack(images).to(device))  # (N, P, E)
    word_map = state["word_map"]
    return decoder, features, word_map["<start>"], word_map["<end>"]


def decode_one_by_one(decoder, features, start, end, **options):
    tokens, alphas = [], []
    for i in range(features.shape[0]):
        t, a = decoder.beam_search(features[i:i + 1], start, end, return_alphas=True, **options)
        tokens += t
        alphas += a
    return tokens, alphas


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_beam_search_equals_one_image_at_a_time(trained, beam_size, length_penalty):
    decoder, features, start, end = trained
    tokens, alphas = decoder.beam_search(features, start, end, beam_size=beam_size, max_steps=MAX_STEPS,
                                         return_alphas=True, length_penalty=length_penalty)
    single_tokens, single_alphas = decode_one_by_one(decoder, features, start, end, beam_size=beam_size,
                                                     max_steps=MAX_STEPS, length_penalty=length_penalty)
    assert tokens == single_tokens
    for a, b in zip(alphas, single_alphas):
        torch.testing.assert_close(a, b)


def untrained_decoder_of_mixed_lengths(device):
    """A random tiny decoder and 24 feature maps (9 x 16) whose beam-3 captions end after 0 to 4
    words for some images and run to any max_steps for the others (<start> 28, <end> 29)."""
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(vocab_size=30, encoder_dim=16, attention_dim=8, embed_dim=6,
                                          decoder_dim=10, dropout=0.0).eval()
    with torch.no_grad():
        decoder.fc.weight.mul_(10)  # confident words, so that some images end at once
    return decoder.to(device), (torch.randn(24, 9, 16) * 3).to(device)


def decode_recording_batch_sizes(monkeypatch, decoder, features):
    """beam_search (beam 3, 15 steps) of features; returns its tokens, alphas and the number of images
    in each step's batch."""
    batch_sizes = []
    step = decoder.step

    def recording_step(encoder_out, *args):
        batch_sizes.append(encoder_out.shape[0])
        return step(encoder_out, *args)

    monkeypatch.setattr(decoder, "step", recording_step)
    tokens, alphas = decoder.beam_search(features, 28, 29, beam_size=3, max_steps=15, return_alphas=True)
    monkeypatch.undo()
    return tokens, alphas, batch_sizes


def test_images_leave_the_batch_when_done_and_decode_as_alone(monkeypatch, device):
    decoder, features = untrained_decoder_of_mixed_lengths(device)
    tokens, alphas, batch_sizes = decode_recording_batch_sizes(monkeypatch, decoder, features)
    lengths = [len(t) for t in tokens]
    assert min(lengths) < 5 and max(lengths) == 15  # some images left early, others decoded on
    assert batch_sizes[0] == 24 and batch_sizes == sorted(batch_sizes, reverse=True)
    assert lengths.count(15) <= batch_sizes[-1] < 24  # an image leaves once all its beams ended
    alone = [decode_recording_batch_sizes(monkeypatch, decoder, features[i:i + 1]) for i in range(24)]
    # Checked at every step and acted on at once: each step's batch holds exactly the images that,
    # decoded alone, were still decoding at that step.
    steps_alone = [len(sizes) for _, _, sizes in alone]
    assert batch_sizes == [sum(s > t for s in steps_alone) for t in range(len(batch_sizes))]
    assert tokens == [t for single_tokens, _, _ in alone for t in single_tokens]
    for a, (_, single_alphas, _) in zip(alphas, alone):
        torch.testing.assert_close(a, single_alphas[0])


def test_beam_size_one_equals_greedy(trained):
    decoder, features, start, end = trained
    beam_tokens, beam_alphas = decoder.beam_search(features, start, end, beam_size=1, max_steps=MAX_STEPS,
                                                   return_alphas=True)
    greedy_tokens, greedy_alphas = decoder.greedy_decode(features, start, end, max_steps=MAX_STEPS,
                                                         return_alphas=True)
    assert beam_tokens == greedy_tokens
    for a, b in zip(beam_alphas, greedy_alphas):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_alphas_have_one_map_per_word_and_sum_to_one(trained, beam_size):
    decoder, features, start, end = trained
    tokens, alphas = decoder.beam_search(features, start, end, beam_size=beam_size, max_steps=MAX_STEPS,
                                         return_alphas=True)
    assert len(alphas) == len(tokens) == features.shape[0]
    for t, a in zip(tokens, alphas):
        assert a.shape == (len(t), features.shape[1])
        torch.testing.assert_close(a.sum(dim=1), torch.ones(len(t)))


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_a_caption_comes_back_when_no_beam_ends(trained, beam_size):
    decoder, features, start, end = trained
    never_ends = copy.deepcopy(decoder)
    with torch.no_grad():
        never_ends.fc.bias[end] = -1e4  # the trained weights, but <end> is never among the best words
    tokens, alphas = never_ends.beam_search(features, start, end, beam_size=beam_size, max_steps=7,
                                            return_alphas=True)
    assert [len(t) for t in tokens] == [7] * features.shape[0]
    assert all(a.shape == (7, features.shape[1]) for a in alphas)
    assert tokens == decode_one_by_one(never_ends, features, start, end, beam_size=beam_size, max_steps=7)[0]
    # The real weights with too few steps: every image still gets its (cut) caption.
    tokens = decoder.beam_search(features, start, end, beam_size=beam_size, max_steps=2)
    assert len(tokens) == features.shape[0] and all(len(t) <= 2 and end not in t for t in tokens)


@pytest.mark.parametrize("attention,output_layer,hard_read", [
    ("hard", "linear", "argmax"), ("hard", "deep", "argmax"), ("hard", "linear", "expectation"),
    ("soft", "deep", "argmax")])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_hard_attention_and_deep_output_decode_batched_as_one_at_a_time(device, attention, output_layer,
                                                                       hard_read, beam_size):
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(vocab_size=30, encoder_dim=16, attention_dim=8, embed_dim=6,
                                          decoder_dim=10, dropout=0.0, attention=attention,
                                          output_layer=output_layer).eval()
    decoder.hard_read = hard_read
    with torch.no_grad():
        decoder.fc.weight.mul_(10)  # confident words, so that captions end at different steps
        decoder.fc.bias[29] = 1.0 if output_layer == "deep" else 0.0  # eq. 7's tanh bounds the scores
    decoder, features = decoder.to(device), (torch.randn(24, 9, 16) * 3).to(device)
    tokens, alphas = decoder.beam_search(features, 28, 29, beam_size=beam_size, max_steps=12,
                                         return_alphas=True)
    assert len({len(t) for t in tokens}) > 1  # images ended at different steps
    single_tokens, single_alphas = decode_one_by_one(decoder, features, 28, 29, beam_size=beam_size,
                                                     max_steps=12)
    assert tokens == single_tokens
    for a, b in zip(alphas, single_alphas):
        torch.testing.assert_close(a, b)
    if beam_size == 1:
        assert decoder.greedy_decode(features, 28, 29, max_steps=12) == tokens
    if attention == "hard":  # what a hard model reads changes what it writes
        other = copy.deepcopy(decoder)
        other.hard_read = "expectation" if hard_read == "argmax" else "argmax"
        assert other.beam_search(features, 28, 29, beam_size=beam_size, max_steps=12) != tokens


def tutorial_beam_search(decoder, features, start, end, beam_size, max_steps, length_penalty=0.0):
    """The tutorial's per-image search (sgrvinod's caption.py), written plainly for one image (1, P, E):
    the k live sequences extend by their k best words; one that emits <end> is set aside and k shrinks
    by one; it stops when k is 0 or after max_steps words. The best set-aside sequence wins, ranked by
    its summed log-probability (divided by ((5 + length) / 6) ** length_penalty). None when none ended."""
    k = beam_size
    encoder_proj = decoder.project_encoder(features)  # (1, P, A)
    h, c = decoder.init_hidden_state(features)  # (1, D) each
    sequences, scores, complete = [[]], torch.zeros(1), []
    for step in range(1, max_steps + 1):
        words = torch.tensor([seq[-1] if seq else start for seq in sequences])  # (s,)
        s = len(sequences)
        h, c = decoder.step(features.expand(s, -1, -1), encoder_proj.expand(s, -1, -1),
                            decoder.embedding(words), h, c)[:2]  # (s, D) each
        candidates = scores.unsqueeze(1) + F.log_softmax(decoder.fc(h), dim=1)  # (s, V)
        # At the first step every row is the same <start>: take the k best words of row 0.
        top_scores, top = (candidates[0] if step == 1 else candidates.view(-1)).topk(k)  # (k,) each
        parents, next_words = top // candidates.shape[1], top % candidates.shape[1]
        new_sequences = [sequences[p] + [w] for p, w in zip(parents.tolist(), next_words.tolist())]
        ended = [i for i, w in enumerate(next_words.tolist()) if w == end]
        going = [i for i, w in enumerate(next_words.tolist()) if w != end]
        complete += [(new_sequences[i][:-1], float(top_scores[i]), step) for i in ended]
        k -= len(ended)
        if k == 0:
            break
        sequences, scores = [new_sequences[i] for i in going], top_scores[going]
        h, c = h[parents[going]], c[parents[going]]
    if not complete:
        return None
    ranks = [score / ((5 + length) / 6) ** length_penalty for _, score, length in complete]
    return complete[ranks.index(max(ranks))][0]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_returns_the_tutorials_caption_on_flat_word_distributions(trained, length_penalty):
    decoder, features, start, end = trained
    flat = copy.deepcopy(decoder)
    with torch.no_grad():  # flatter word distributions: unfinished beams often outscore finished ones
        flat.fc.weight.div_(4)
        flat.fc.bias.div_(4)
    steps = 30  # flatter distributions end later: room for most images to finish
    tokens = flat.beam_search(features, start, end, beam_size=5, max_steps=steps, length_penalty=length_penalty)
    with torch.no_grad():
        expected = [tutorial_beam_search(flat, features[i:i + 1], start, end, 5, steps, length_penalty)
                    for i in range(features.shape[0])]
    compared = [(t, e) for t, e in zip(tokens, expected) if e is not None]  # where the tutorial returns one
    assert len(compared) >= features.shape[0] // 4
    assert [t for t, _ in compared] == [e for _, e in compared]
