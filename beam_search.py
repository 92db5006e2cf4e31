"""Beam search and greedy decoding of a DecoderWithAttention, from encoder features.

    from beam_search import beam_search
    tokens = beam_search(decoder, encoder_out, word_map["<start>"], word_map["<end>"], beam_size=5)
    tokens, alphas, scores = beam_search(decoder, encoder_out, start, end, return_alphas=True, return_scores=True)
    tokens = beam_search(decoder, encoder_out, start, end, beam_size=5, length_penalty=1.0)

`decoder.beam_search(...)` and `decoder.greedy_decode(...)` call these.

Beam search keeps the K best unfinished captions so far (live beams) of every image, scored by their
summed log-probabilities as in the tutorial, and advances all beams of all images as one tensor batch.
At the start only beam 0 is live. A beam that emits `<end>` is finished: it leaves the live beams and
the image goes on with one live beam fewer, exactly as the tutorial's search does, so a finished
caption is never pushed out by live beams that score higher now and finish lower later. Of the
finished captions each image keeps only the best by the ranking score (`rank_score`: the summed
log-probability, or with `length_penalty` alpha > 0 that sum divided by Wu et al. 2016's
((5 + |y|) / 6) ** alpha, |y| the words scored, `<end>` included). An image with no live beam left
leaves the batch at once (checked every step), so the images still decoding do not carry it.
Decoding stops when every image has left or after `max_steps` words. The best finished caption wins,
or the best unfinished one when none finished, so a caption is always returned. Beam size 1 is greedy
decoding.

Shapes as in models.py, with n the images still decoding, m those leaving, t the words so far.
"""

import math

import torch
import torch.nn.functional as F

LENGTH_PENALTY_HELP = ("alpha of the length penalty that ranks finished beams: their summed log-probability "
                       "divided by ((5 + length) / 6) ** alpha (Wu et al. 2016); 0 ranks by the sum itself, "
                       "higher favours longer captions (default 0)")
# The most words a caption gets, `<end>` included, unless told otherwise: the tutorial's beam search runs
# 51 steps (its loop breaks once `step > 50`), so a model that never says `<end>` gets its caption here too.
MAX_STEPS = 51


def is_unfinished(tokens, max_steps):
    """Whether a caption was cut off at `max_steps` without `<end>`: a finished one has at most
    max_steps - 1 words, since its `<end>` takes a step."""
    return len(tokens) >= max_steps


@torch.no_grad()
def beam_search(decoder, encoder_out, start_token, end_token, beam_size=3, max_steps=MAX_STEPS,
                return_alphas=False, return_scores=False, length_penalty=0.0):
    """Batched beam search (see the module docstring).

    Args:
        decoder: a DecoderWithAttention; encoder_out: (B, P, E) float.
        start_token, end_token: word-map indices of `<start>` and `<end>`.
        beam_size: K; max_steps: the most words generated per caption, `<end>` included.
        return_alphas: also return each word's attention map.
        return_scores: also return each caption's summed log-probability, its `<end>` included.
        length_penalty: alpha of `rank_score`, which ranks finished captions (0: by that sum).
    Returns:
        tokens: list of B lists of word indices, without `<start>` and `<end>`.
        alphas (only with return_alphas): list of B float tensors (len(tokens[i]), P).
        scores (only with return_scores, last): list of B floats.
    """
    if max_steps < 1 or length_penalty < 0:
        raise ValueError(f"beam search needs max_steps >= 1 and length_penalty >= 0, got {max_steps}, "
                         f"{length_penalty}")
    k, (batch_size, num_pixels, _), device = beam_size, encoder_out.shape, encoder_out.device
    # Once per image, not per beam: the beams of an image read its features by broadcasting.
    encoder_proj = decoder.project_encoder(encoder_out)  # (B, P, A)
    h, c = (x.repeat_interleave(k, dim=0) for x in decoder.init_hidden_state(encoder_out))  # (B*K, D) each
    # The beams of the n images still decoding; an image's K beams are consecutive rows of h, c, words.
    images = torch.arange(batch_size)  # (n,) on the host: their indices in encoder_out
    words, beam_scores, sequences, alpha_history = first_beams(encoder_out, k, start_token)
    best = FinishedCaptions(encoder_out, k, return_alphas)  # the best finished caption of each image
    captions = [None] * batch_size  # (tokens, alphas or None, score) of each image, once it has left
    for t in range(max_steps):
        n = len(images)
        scores, h, c, alpha = decoder.decode_step(encoder_out, encoder_proj, words, h, c)  # (n*K, V|D|D|P)
        log_probs = F.log_softmax(scores, dim=1).view(n, k, -1)  # (n, K, V)
        beam_scores, parent, next_words = best_extensions(beam_scores, log_probs, best.places)  # (n, K) each
        rows = (torch.arange(n, device=device).unsqueeze(1) * k + parent).view(-1)  # (n*K,) the parents' rows
        sequences = extend_beams(sequences, parent, next_words)  # (n, K, t+1)
        if return_alphas:  # a new word's map is the one its parent beam attended with at this step
            alpha_history = extend_beams(alpha_history, parent, alpha[rows].view(-1, k, num_pixels))  # (n, K, t+1, P)
        # Beams that just emitted <end> move to the finished captions and stop being live.
        just_finished = (next_words == end_token) & (beam_scores > -math.inf)  # (n, K)
        best.add(just_finished, sequences, alpha_history, beam_scores,
                 rank_score(beam_scores, t + 1, length_penalty), end_token)
        beam_scores = beam_scores.masked_fill(just_finished, -math.inf)  # (n, K)
        h, c, words = h[rows], c[rows], next_words.view(-1)  # (n*K, D), (n*K, D), (n*K,)

        # An image with no live beam left leaves the batch; after the last step, all do.
        no_live = (beam_scores == -math.inf).all(dim=1)  # (n,)
        done = no_live.cpu() if t + 1 < max_steps else torch.ones(n, dtype=torch.bool)  # (n,)
        if done.any():
            leaving = done.to(device)
            keep_captions(captions, images[done], *best.or_best_live(leaving, sequences, alpha_history, beam_scores),
                          end_token, return_alphas)
            if done.all():
                break
            images, live = images[~done], (~done).nonzero().squeeze(1).to(device)  # (n',) each
            live_rows = (live.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)  # (n'*K,)
            encoder_out, encoder_proj, beam_scores, sequences, alpha_history = (
                x[live] for x in (encoder_out, encoder_proj, beam_scores, sequences, alpha_history))
            best.keep(live)
            h, c, words = h[live_rows], c[live_rows], words[live_rows]  # (n'*K, D), (n'*K, D), (n'*K,)
    return decode_outputs(captions, return_alphas, return_scores)


def first_beams(encoder_out, k, start_token):
    """The K beams of each image before the first word: their last words (B*K,) all `<start>`, their
    scores (B, K), their words (B, K, 0) and maps (B, K, 0, P). Only beam 0 is live (score 0), so that
    the K beams do not start as K copies of one; a beam that is not live (never started, or finished)
    has score -inf and extends to nothing."""
    (batch_size, num_pixels, _), device = encoder_out.shape, encoder_out.device
    words = torch.full((batch_size * k,), start_token, dtype=torch.long, device=device)  # (B*K,)
    beam_scores = torch.full((batch_size, k), -math.inf, device=device)  # (B, K)
    beam_scores[:, 0] = 0.0
    sequences = torch.empty(batch_size, k, 0, dtype=torch.long, device=device)  # (B, K, 0)
    return words, beam_scores, sequences, encoder_out.new_empty(batch_size, k, 0, num_pixels)  # (B, K, 0, P)


def rank_score(log_prob_sums, length, length_penalty):
    """The score that ranks finished captions of `length` words (`<end>` included): the summed
    log-probability divided by Wu et al. 2016's length penalty ((5 + length) / 6) ** alpha. Alpha 0 is
    the sum itself; a larger alpha favours longer captions, whose sums are lower only for being longer."""
    if length_penalty == 0:
        return log_prob_sums
    return log_prob_sums / ((5.0 + length) / 6.0) ** length_penalty


def best_extensions(beam_scores, log_probs, places):
    """The best one-word extensions of each image's live beams, as many as it has places.

    Args:
        beam_scores: (n, K) float, each beam's summed log-probability, -inf where it is not live.
        log_probs: (n, K, V) float, the next word's log-probabilities.
        places: (n, 1) long, K less the image's finished captions.
    Returns:
        the new beams' scores (n, K), their parent beams (n, K) and their last words (n, K); an image
        with L places gets its L best extensions, best first, and K - L beams of score -inf.
    """
    n, k, vocab_size = log_probs.shape
    candidates = (beam_scores.unsqueeze(2) + log_probs).view(n, -1)  # (n, K*V), -inf from beams not live
    scores, flat_index = candidates.topk(k, dim=1)  # (n, K)
    # An image whose finished captions left the beam continues with that many beams fewer.
    scores = scores.masked_fill(torch.arange(k, device=scores.device) >= places, -math.inf)  # (n, K)
    return scores, flat_index // vocab_size, flat_index % vocab_size


def extend_beams(history, parent, new):
    """Each new beam's history, copied from its parent, then its new entry: history (n, K, t, ...),
    parent (n, K), new (n, K, ...). Returns (n, K, t+1, ...)."""
    index = parent.view(*parent.shape, *[1] * (history.dim() - 2)).expand(-1, -1, *history.shape[2:])
    return torch.cat([history.gather(1, index), new.unsqueeze(2)], dim=2)  # (n, K, t+1, ...)


class FinishedCaptions:
    """The best finished caption of each of the n images still decoding, by ranking score, kept apart
    from the live beams, and how many places in the beam each image has left (K less its finished
    captions). Its words are padded with `<end>` as the search goes on."""

    def __init__(self, encoder_out, k, keep_alphas):
        (batch_size, num_pixels, _), device = encoder_out.shape, encoder_out.device
        self.keep_alphas = keep_alphas
        self.places = torch.full((batch_size, 1), k, device=device)  # (n, 1)
        self.rank = torch.full((batch_size,), -math.inf, device=device)  # (n,) -inf: none finished yet
        self.score = torch.full((batch_size,), -math.inf, device=device)  # (n,) its summed log-probability
        self.words = torch.empty(batch_size, 0, dtype=torch.long, device=device)  # (n, t)
        self.alphas = encoder_out.new_empty(batch_size, 0, num_pixels)  # (n, t, P)

    def add(self, just_finished, sequences, alpha_history, scores, ranks, end_token):
        """Take, per image, the best of the beams that just finished (n, K) bool where it ranks above
        the best so far; sequences (n, K, t), alpha_history (n, K, t, P), scores and ranks (n, K)."""
        n = self.words.shape[0]
        self.places = self.places - just_finished.sum(dim=1, keepdim=True)  # (n, 1)
        self.words = F.pad(self.words, (0, 1), value=end_token)  # (n, t)
        if self.keep_alphas:  # the <end> step's map, never returned
            self.alphas = F.pad(self.alphas, (0, 0, 0, 1))  # (n, t, P)
        ranks = ranks.masked_fill(~just_finished, -math.inf)  # (n, K)
        top_rank, top = ranks.max(dim=1)  # (n,) each: the first of equals, as the tutorial's list.index(max)
        better = top_rank > self.rank  # (n,) strictly: an earlier caption wins a tie, as in the tutorial
        rows = torch.arange(n, device=top.device)  # (n,)
        self.rank = torch.where(better, top_rank, self.rank)
        self.score = torch.where(better, scores[rows, top], self.score)
        self.words = torch.where(better.unsqueeze(1), sequences[rows, top], self.words)  # (n, t)
        if self.keep_alphas:
            self.alphas = torch.where(better.view(n, 1, 1), alpha_history[rows, top], self.alphas)  # (n, t, P)

    def keep(self, live):
        """Keep only the images `live` (n',) long, as the search drops the others."""
        self.rank, self.score, self.places, self.words, self.alphas = (
            x[live] for x in (self.rank, self.score, self.places, self.words, self.alphas))

    def or_best_live(self, leaving, sequences, alpha_history, beam_scores):
        """For the m images picked by `leaving` (n,) bool: the best finished caption, or the best live
        beam when none finished (cut at max_steps). Returns its words (m, t), maps (m, t, P), score (m,)."""
        sequences, alpha_history, beam_scores = (x[leaving] for x in (sequences, alpha_history, beam_scores))
        live_best = beam_scores.argmax(dim=1)  # (m,)
        rows = torch.arange(live_best.shape[0], device=live_best.device)  # (m,)
        has_finished = (self.rank[leaving] > -math.inf)  # (m,)
        words = torch.where(has_finished.unsqueeze(1), self.words[leaving], sequences[rows, live_best])  # (m, t)
        score = torch.where(has_finished, self.score[leaving], beam_scores[rows, live_best])  # (m,)
        alphas = alpha_history[rows, live_best]  # (m, t, P), or (m, 0, P) when no maps are kept
        if self.keep_alphas:
            alphas = torch.where(has_finished.view(-1, 1, 1), self.alphas[leaving], alphas)  # (m, t, P)
        return words, alphas, score


def keep_captions(captions, images, sequences, alphas, scores, end_token, return_alphas):
    """Store in captions[i] the caption of each image i of `images` (m,): its words up to `<end>`,
    their maps (with return_alphas) and its score, from sequences (m, t), alphas (m, t, P), scores (m,)."""
    alphas = alphas.cpu() if return_alphas else None  # (m, t, P), one copy for the m images
    for i, (image, words, score) in enumerate(zip(images.tolist(), sequences.tolist(), scores.tolist())):
        length = words.index(end_token) if end_token in words else len(words)
        # The maps of the words returned: the <end> step's map is dropped with the word.
        captions[image] = (words[:length], alphas[i, :length] if return_alphas else None, score)


def decode_outputs(captions, return_alphas, return_scores):
    """beam_search's and greedy_decode's return value from captions, a list of (tokens, alphas, score)."""
    tokens, alphas, scores = (list(column) for column in zip(*captions))
    outputs = (tokens,) + ((alphas,) if return_alphas else ()) + ((scores,) if return_scores else ())
    return outputs if len(outputs) > 1 else tokens


@torch.no_grad()
def greedy_decode(decoder, encoder_out, start_token, end_token, max_steps=MAX_STEPS, return_alphas=False,
                  return_scores=False):
    """Greedy decoding: the most likely word at every step. Same inputs and outputs as `beam_search`;
    written separately so that the two can check each other."""
    batch_size = encoder_out.shape[0]
    encoder_proj = decoder.project_encoder(encoder_out)  # (B, P, A)
    h, c = decoder.init_hidden_state(encoder_out)  # (B, D) each
    words = torch.full((batch_size,), start_token, dtype=torch.long, device=encoder_out.device)  # (B,)
    ended = torch.zeros(batch_size, dtype=torch.bool, device=encoder_out.device)  # (B,)
    step_words, step_alphas, step_log_probs = [], [], []
    for _ in range(max_steps):
        logits, h, c, alpha = decoder.decode_step(encoder_out, encoder_proj, words, h, c)  # (B, V|D|D|P)
        words = logits.argmax(dim=1)  # (B,)
        log_prob = F.log_softmax(logits, dim=1).gather(1, words.unsqueeze(1)).squeeze(1)  # (B,)
        step_words.append(words)
        step_alphas.append(alpha)
        step_log_probs.append(log_prob)
        ended |= words == end_token
        if bool(ended.all()):
            break
    all_words = torch.stack(step_words, dim=1).tolist()  # (B, t)
    all_alphas = torch.stack(step_alphas, dim=1).cpu()  # (B, t, P)
    all_log_probs = torch.stack(step_log_probs, dim=1).cpu()  # (B, t)
    captions = []
    for seq, alphas, log_probs in zip(all_words, all_alphas, all_log_probs):
        length = seq.index(end_token) if end_token in seq else len(seq)
        # Its <end> counts in its score, when it ended.
        captions.append((seq[:length], alphas[:length], float(log_probs[:length + 1].sum())))
    return decode_outputs(captions, return_alphas, return_scores)
