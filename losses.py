"""The training loss, in one home: cross-entropy over the real (non-pad) words plus the doubly
stochastic attention penalty of the paper (eq. 14). Training calls `caption_loss`; validation adds up
`caption_loss_sums` over the split and turns them into the same loss with `loss_from_sums`.

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
