"""Beam search and greedy decoding of a DecoderWithAttention, from encoder features.

    from beam_search import beam_search
    tokens = beam_search(decoder, encoder_out, word_map["<start>"], word_map["<end>"], beam_size=5)
    tokens, alphas, scores = beam_search(decoder, encoder_out, start, end, return_alphas=True, return_scores=True)

`decoder.beam_search(...)` and `decoder.greedy_decode(...)` call these.

Beam search keeps the K best captions so far (beams) of every image, scored by their summed
log-probabilities as in the tutorial, and advances all beams of all images as one tensor batch. At
the start only beam 0 is live. A beam that emits `<end>` is finished: from then on it extends only
by a dummy `<end>` of log-probability 0, so it keeps its score and holds its place among the K best,
and images finish independently. An image whose K beams have all finished leaves the batch at once
(checked every step), so the images still decoding do not carry it. Decoding stops when every image
has left or after `max_steps` words. The best finished beam wins, or the best unfinished one when
none finished, so a caption is always returned. Beam size 1 is greedy decoding.

Shapes as in models.py, with n the images still decoding, m those leaving, t the words so far.
"""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def beam_search(decoder, encoder_out, start_token, end_token, beam_size=3, max_steps=50,
                return_alphas=False, return_scores=False):
    """Batched beam search (see the module docstring).

    Args:
        decoder: a DecoderWithAttention.
        encoder_out: (B, P, E) float.
        start_token, end_token: word-map indices of `<start>` and `<end>`.
        beam_size: K.
        max_steps: the most words generated per caption, `<end>` included.
        return_alphas: also return each word's attention map.
        return_scores: also return each caption's summed log-probability, its `<end>` included.
    Returns:
        tokens: list of B lists of word indices, without `<start>` and `<end>`.
        alphas (only with return_alphas): list of B float tensors (len(tokens[i]), P).
        scores (only with return_scores, last): list of B floats.
    """
    if max_steps < 1:
        raise ValueError(f"beam search needs max_steps >= 1, got {max_steps}")
    k, (batch_size, num_pixels, _), device = beam_size, encoder_out.shape, encoder_out.device
    # Once per image, not per beam: the beams of an image read its features by broadcasting.
    encoder_proj = decoder.project_encoder(encoder_out)  # (B, P, A)
    h, c = decoder.init_hidden_state(encoder_out)  # (B, D) each
    h, c = h.repeat_interleave(k, dim=0), c.repeat_interleave(k, dim=0)  # (B*K, D) each

    # The beams of the n images still decoding; an image's K beams are consecutive rows of h, c, words.
    images = torch.arange(batch_size)  # (n,) on the host: their indices in encoder_out
    words = torch.full((batch_size * k,), start_token, dtype=torch.long, device=device)  # (n*K,)
    beam_scores = torch.full((batch_size, k), -math.inf, device=device)  # (n, K)
    beam_scores[:, 0] = 0.0  # only beam 0 is live: the K beams do not start as K copies of one
    finished = torch.zeros(batch_size, k, dtype=torch.bool, device=device)  # (n, K)
    sequences = torch.empty(batch_size, k, 0, dtype=torch.long, device=device)  # (n, K, t)
    alpha_history = encoder_out.new_empty(batch_size, k, 0, num_pixels)  # (n, K, t, P)
    captions = [None] * batch_size  # (tokens, alphas or None, score) of each image, once it has left
    for t in range(max_steps):
        n = len(images)
        scores, h, c, alpha = decoder.decode_step(encoder_out, encoder_proj, words, h, c)  # (n*K, V|D|D|P)
        log_probs = F.log_softmax(scores, dim=1).view(n, k, -1)  # (n, K, V)
        beam_scores, parent, next_words = best_extensions(beam_scores, log_probs, finished, end_token)  # (n, K) each
        rows = (torch.arange(n, device=device).unsqueeze(1) * k + parent).view(-1)  # (n*K,) the parents' rows
        sequences = torch.cat([gather_beams(sequences, parent), next_words.unsqueeze(2)], dim=2)  # (n, K, t+1)
        if return_alphas:  # a new word's map is the one its parent beam attended with at this step
            new_alphas = alpha[rows].view(-1, k, 1, num_pixels)  # (n, K, 1, P)
            alpha_history = torch.cat([gather_beams(alpha_history, parent), new_alphas], dim=2)  # (n, K, t+1, P)
        finished = finished.gather(1, parent) | (next_words == end_token)  # (n, K)
        h, c, words = h[rows], c[rows], next_words.view(-1)  # (n*K, D), (n*K, D), (n*K,)

        # An image whose K beams have all finished leaves the batch; after the last step, all do.
        done = finished.all(dim=1).cpu() if t + 1 < max_steps else torch.ones(n, dtype=torch.bool)  # (n,)
        if done.any():
            best = best_beams(done.to(device), sequences, alpha_history, beam_scores, finished)
            keep_captions(captions, images[done], *best, end_token, return_alphas)
            if done.all():
                break
            images, live = images[~done], (~done).nonzero().squeeze(1).to(device)  # (n',) each
            live_rows = (live.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)  # (n'*K,)
            encoder_out, encoder_proj, beam_scores, finished, sequences, alpha_history = (
                x[live] for x in (encoder_out, encoder_proj, beam_scores, finished, sequences, alpha_history))
            h, c, words = h[live_rows], c[live_rows], words[live_rows]  # (n'*K, D), (n'*K, D), (n'*K,)
    return decode_outputs(captions, return_alphas, return_scores)


def best_extensions(beam_scores, log_probs, finished, end_token):
    """The K best one-word extensions of each image's K beams.

    A finished beam extends only by one dummy `<end>` with log-probability 0: it keeps its score and
    competes for its place among the K with the unfinished beams' extensions.

    Args:
        beam_scores: (n, K) float, each beam's summed log-probability.
        log_probs: (n, K, V) float, the next word's log-probabilities (overwritten).
        finished: (n, K) bool.
    Returns:
        the new beams' scores (n, K), their parent beams (n, K) and their last words (n, K).
    """
    n, k, vocab_size = log_probs.shape
    log_probs.masked_fill_(finished.unsqueeze(2), -math.inf)
    log_probs[:, :, end_token].masked_fill_(finished, 0.0)
    candidates = (beam_scores.unsqueeze(2) + log_probs).view(n, -1)  # (n, K*V)
    scores, flat_index = candidates.topk(k, dim=1)  # (n, K)
    return scores, flat_index // vocab_size, flat_index % vocab_size


def gather_beams(history, parent):
    """Each new beam's history, copied from its parent: history (n, K, t, ...), parent (n, K)."""
    index = parent.view(*parent.shape, *[1] * (history.dim() - 2)).expand(-1, -1, *history.shape[2:])
    return history.gather(1, index)  # (n, K, t, ...)


def best_beams(leaving, sequences, alpha_history, beam_scores, finished):
    """The best finished beam of each of the m images picked by `leaving` (n,) bool, or the best of
    all its beams when none finished.

    sequences (n, K, t); alpha_history (n, K, t, P); beam_scores and finished (n, K).
    Returns its words (m, t), its maps (m, t, P) and its score (m,).
    """
    sequences, alpha_history, beam_scores, finished = (
        x[leaving] for x in (sequences, alpha_history, beam_scores, finished))  # (m, ...) each
    ranked = torch.where(finished, beam_scores, beam_scores - 1e9)  # (m, K)
    best = ranked.argmax(dim=1)  # (m,)
    rows = torch.arange(best.shape[0], device=best.device)  # (m,)
    return sequences[rows, best], alpha_history[rows, best], beam_scores[rows, best]


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
def greedy_decode(decoder, encoder_out, start_token, end_token, max_steps=50, return_alphas=False,
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
