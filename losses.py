"""The training loss, in one home: cross-entropy over the real (non-pad) words plus the doubly
stochastic attention penalty of the paper (eq. 14). Training calls `caption_loss`; validation adds up
`caption_loss_sums` over the split and turns them into the same loss with `loss_from_sums`. Hard
attention adds `hard_attention_terms` (section 4.1): REINFORCE with a moving-average baseline, and an
entropy bonus.

    from losses import caption_loss
    loss, word_scores, word_targets = caption_loss(scores, captions, decode_lengths, alphas, alpha_c=1.0)
"""

import torch
import torch.nn.functional as F


def real_words(scores, captions, decode_lengths):
    """The (N, V) float scores and (N,) targets of the N real (non-pad) words of a batch.

    scores: (B, T, V) from the decoder; captions: (B, L) with <start> first; decode_lengths: (B,).
    """
    steps = scores.shape[1]
    targets = captions[:, 1:steps + 1]  # (B, T)
    mask = torch.arange(steps, device=scores.device).unsqueeze(0) < decode_lengths.unsqueeze(1)  # (B, T)
    return scores[mask].float(), targets[mask]  # (N, V), (N,)


def attention_penalty(alphas):
    """Doubly stochastic attention penalty per caption (eq. 14 of the paper): each pixel's attention
    summed over the caption should be near 1 (padded steps hold zeros). alphas (B, T, P) -> (B,)."""
    return ((1.0 - alphas.float().sum(dim=1)) ** 2).mean(dim=1)


def caption_loss(scores, captions, decode_lengths, alphas, alpha_c):
    """Cross-entropy over real (non-pad) words plus `alpha_c` times the mean attention penalty.

    Returns:
        loss (scalar), and the (N, V) scores and (N,) targets of the N real words (for accuracy).
    """
    real_scores, real_targets = real_words(scores, captions, decode_lengths)
    loss = F.cross_entropy(real_scores, real_targets) + alpha_c * attention_penalty(alphas).mean()
    return loss, real_scores, real_targets


def top5_correct(scores, targets):
    """How many targets are among the 5 highest scores."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, 5)
    return (top == targets.unsqueeze(1)).any(dim=1).sum().item()


def caption_loss_sums(scores, captions, decode_lengths, alphas):
    """The sums that `caption_loss` averages, for a loss over a whole split taken batch by batch (or
    shard by shard): its value does not depend on how the split is batched.

    Returns {"word_loss": cross-entropy summed over the real words, "words": their number,
    "penalty": attention penalty summed over the captions, "captions": their number, "top5": real
    words among the 5 highest scores}; `loss_from_sums` turns them into the loss.
    """
    real_scores, real_targets = real_words(scores, captions, decode_lengths)
    return {"word_loss": F.cross_entropy(real_scores, real_targets, reduction="sum").item(),
            "words": real_targets.numel(), "penalty": attention_penalty(alphas).sum().item(),
            "captions": alphas.shape[0], "top5": top5_correct(real_scores, real_targets)}


def loss_from_sums(sums, alpha_c):
    """`caption_loss` from the sums of `caption_loss_sums`: mean word loss + alpha_c * mean penalty."""
    return sums["word_loss"] / max(sums["words"], 1) + alpha_c * sums["penalty"] / max(sums["captions"], 1)


def caption_log_likelihoods(scores, captions, decode_lengths):
    """log p(y | s, a) of each caption: its real words' log-probabilities summed. (B, T, V) -> (B,)."""
    steps = scores.shape[1]
    targets = captions[:, 1:steps + 1]  # (B, T)
    mask = torch.arange(steps, device=scores.device).unsqueeze(0) < decode_lengths.unsqueeze(1)  # (B, T)
    word_log_probs = F.log_softmax(scores.float(), dim=2).gather(2, targets.unsqueeze(2)).squeeze(2)  # (B, T)
    return (word_log_probs * mask).sum(dim=1)


def hard_attention_terms(scores, captions, decode_lengths, alphas, locations, baseline, reinforce_weight,
                         entropy_weight):
    """What hard attention adds to `caption_loss` (section 4.1, eq. 12), as a loss to minimise.

    The cross-entropy of the words given the sampled cells is eq. 12's first term and is already in
    `caption_loss`. The cells were sampled, so no gradient reaches alpha through them: this adds
    REINFORCE's, reinforce_weight * (log p(y | s, a) - b) * d log p(s | a), and the entropy bonus,
    entropy_weight * d H[alpha], over the steps that sampled a cell. Both are divided by the number
    of real words, as the cross-entropy is; reinforce_weight 1 would make the whole the Monte Carlo
    gradient of the lower bound L_s (per word).

    Args:
        scores (B, T, V), captions (B, L), decode_lengths (B,), alphas (B, T, P): as for caption_loss.
        locations: (B, T) long, the sampled cell of each step, -1 where none was sampled (padding,
            and the captions that read the expectation).
        baseline: b, the moving average of log p(y | s, a), or None before the first batch (the
            batch's own mean is then used).
    Returns:
        the term (scalar), and the sum and count of log p(y | s, a) over the captions that sampled,
        for the baseline's update (`updated_baseline`).
    """
    sampled = locations >= 0  # (B, T)
    sampled_captions = sampled.any(dim=1)  # (B,)
    rewards = caption_log_likelihoods(scores, captions, decode_lengths).detach()  # (B,)
    reward_sum, count = rewards[sampled_captions].sum(), int(sampled_captions.sum())
    if baseline is None:
        baseline = float(reward_sum) / max(count, 1)
    alphas = alphas.float()
    chosen = alphas.gather(2, locations.clamp(min=0).unsqueeze(2)).squeeze(2)  # (B, T), alpha of each cell read
    # log p(s | a) of each caption: the sampled steps' log alpha (a sampled cell has alpha > 0).
    location_log_probs = torch.where(sampled, chosen.clamp(min=1e-30).log(), 0.0).sum(dim=1)  # (B,)
    # alpha log alpha, 0 where alpha is 0 (a map after a caption's end, or an underflow), with a finite
    # gradient there too: xlogy's would be -inf, and times the zero weight of an unsampled step, NaN.
    entropies = -(alphas * alphas.clamp(min=torch.finfo(alphas.dtype).tiny).log()).sum(dim=2)  # (B, T)
    entropy = torch.where(sampled, entropies, 0.0).sum(dim=1)  # (B,)
    words = decode_lengths.sum().clamp(min=1)
    objective = reinforce_weight * (rewards - baseline) * location_log_probs + entropy_weight * entropy  # (B,)
    return -(objective * sampled_captions).sum() / words, reward_sum, count


def updated_baseline(baseline, reward_sum, count, decay):
    """b_k = decay * b_k-1 + (1 - decay) * log p(y | s_k, a), with the mean over the batch's sampled
    captions as log p(y | s_k, a) (section 4.1: decay 0.9). The first batch starts b at its mean;
    a batch without sampled captions leaves it as it is."""
    if count == 0:
        return baseline
    mean = reward_sum / count
    return mean if baseline is None else decay * baseline + (1.0 - decay) * mean
