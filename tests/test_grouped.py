"""Steps grouped by image (train.py --captions-per-image-per-step K): the same loss and gradients as one
image per caption, every caption once an epoch, and the encoder once per image."""
from collections import Counter

import pytest
import torch

import losses
import train
from conftest import TINY_MODEL
from datasets import CaptionDataset
from models import DecoderWithAttention, Encoder
from utils import UserError


def tiny_models():
    """A fine-tuned ResNet-18 cut after layer1 (a 4x4 grid at 32x32) and a small decoder, dropout off."""
    torch.manual_seed(0)
    encoder = Encoder("resnet18", encoded_size=4, pretrained=False, fine_tune=True, cut_after="layer1")
    decoder = DecoderWithAttention(vocab_size=30, encoder_dim=encoder.encoder_dim, attention_dim=16, embed_dim=8,
                                   decoder_dim=12)
    return encoder.eval(), decoder.eval()


def loss_and_gradients(encoder, decoder, images, captions, lengths, per_image=1):
    """train.py's loss on one batch, and the gradient of every parameter of both models."""
    scores, alphas, decode_lengths = decoder(encoder(images), captions, lengths, per_image)
    loss = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=1.0)[0]
    params = [*encoder.parameters(), *decoder.parameters()]
    return loss, torch.autograd.grad(loss, params)


def test_a_grouped_batch_gives_the_loss_and_gradients_of_one_image_per_caption():
    encoder, decoder = tiny_models()
    images_per_step, per_image = 3, 4
    g = torch.Generator().manual_seed(2)
    images = torch.randn(images_per_step, 3, 32, 32, generator=g)  # (n, 3, S, S)
    lengths = torch.randint(3, 10, (images_per_step * per_image,), generator=g)  # (n*K,), unequal: sorted apart
    captions = torch.randint(4, 30, (images_per_step * per_image, 10), generator=g)  # (n*K, L)
    image_index = torch.arange(images_per_step).repeat_interleave(per_image)  # (n*K,)

    grouped_loss, grouped_grads = loss_and_gradients(encoder, decoder, images, captions, lengths, per_image)
    # The same captions, each row with its own copy of its image, as --captions-per-image-per-step 1 feeds them.
    pairs_loss, pairs_grads = loss_and_gradients(encoder, decoder, images[image_index], captions, lengths)
    torch.testing.assert_close(grouped_loss, pairs_loss, rtol=1e-5, atol=1e-6)
    assert len(grouped_grads) == len(pairs_grads)
    for grouped, pairs in zip(grouped_grads, pairs_grads):
        torch.testing.assert_close(grouped, pairs, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grouped_grads[:len(list(encoder.parameters()))])  # the encoder learns


def test_a_caption_paired_with_another_image_changes_the_loss():
    # The check above could pass if the decoder ignored which image a caption belongs to.
    encoder, decoder = tiny_models()
    images = torch.randn(2, 3, 32, 32)
    captions, lengths = torch.randint(4, 30, (4, 8)), torch.tensor([8, 6, 7, 5])
    right, _ = loss_and_gradients(encoder, decoder, images, captions, lengths, 2)
    wrong, _ = loss_and_gradients(encoder, decoder, images.flip(0), captions, lengths, 2)
    assert not torch.isclose(right, wrong)


def test_grouped_items_hold_k_captions_of_one_image_and_cover_every_caption_once(packed_data):
    single = CaptionDataset(packed_data, "train")
    grouped = CaptionDataset(packed_data, "train", captions_per_item=5)
    assert single.captions_per_image == 5 and len(grouped) * 5 == len(single)
    for i in range(len(grouped)):
        image, captions, lengths = grouped[i]
        assert captions.shape == (5, single.captions.shape[1]) and lengths.shape == (5,)
        for k in range(5):
            other_image, caption, length = single[5 * i + k]
            assert torch.equal(image, other_image) and torch.equal(captions[k], caption) and lengths[k] == length


def test_a_group_size_that_does_not_divide_the_captions_per_image_is_refused(packed_data, capsys):
    with pytest.raises(UserError, match=r"train\.h5.*5 captions each.*groups of 3"):
        CaptionDataset(packed_data, "train", captions_per_item=3)
    with pytest.raises(SystemExit):
        train.parse_args(["--data-folder", "d", "--batch-size", "32", "--captions-per-image-per-step", "5"])
    assert "not a multiple of --captions-per-image-per-step 5" in capsys.readouterr().err


def test_a_grouped_epoch_trains_every_caption_once_and_runs_the_encoder_once_per_image(packed_data, tmp_path,
                                                                                       monkeypatch):
    steps = []
    real_step = train.train_step

    def recording_step(run, images, captions, lengths, step, stop, per_image=1):
        steps.append((images.shape[0], captions.clone(), per_image))
        return real_step(run, images, captions, lengths, step, stop, per_image)

    monkeypatch.setattr(train, "train_step", recording_step)
    model = [a if a != "16" else "20" for a in TINY_MODEL]  # --batch-size 20: 4 images x 5 captions
    train.main(["--data-folder", str(packed_data), "--output-dir", str(tmp_path), "--epochs", "1",
                "--captions-per-image-per-step", "5", *model])

    dataset = CaptionDataset(packed_data, "train")
    images = len(dataset) // 5
    # The encoder saw 4 images a step (the last step what was left), each with its 5 captions.
    assert [n for n, _, _ in steps] == [4] * (images // 4) + ([images % 4] if images % 4 else [])
    assert all(captions.shape[0] == 5 * n and per_image == 5 for n, captions, per_image in steps)
    trained = Counter(tuple(row.tolist()) for _, captions, _ in steps for row in captions)
    assert trained == Counter(tuple(row.tolist()) for row in dataset.captions)  # each caption once
    # The 5 captions of each image in a step are that image's 5 captions.
    per_image = {tuple(tuple(r.tolist()) for r in dataset.captions[i:i + 5]) for i in range(0, len(dataset), 5)}
    assert all(tuple(tuple(r.tolist()) for r in captions[j:j + 5]) in per_image
               for _, captions, _ in steps for j in range(0, 20, 5))


def test_a_grouped_hard_attention_batch_has_no_cell_and_no_map_after_each_caption_s_end():
    # An image's captions step until its longest ends; the shorter ones' extra steps must leave no trace.
    torch.manual_seed(0)
    decoder = DecoderWithAttention(vocab_size=30, encoder_dim=6, attention_dim=5, embed_dim=4, decoder_dim=7,
                                   attention="hard", hard_expectation_prob=0.0).train()
    lengths = torch.tensor([9, 4, 6, 3, 8, 5])  # two images, three captions each
    captions = torch.randint(4, 30, (6, 9))
    scores, alphas, decode_lengths, locations = decoder(torch.randn(2, 9, 6), captions, lengths,
                                                        captions_per_image=3, return_locations=True)
    real = torch.arange(scores.shape[1]) < decode_lengths.unsqueeze(1)  # (B, T)
    assert (locations[real] >= 0).all() and (locations[~real] == -1).all()
    assert (alphas[~real] == 0).all() and torch.allclose(alphas[real].sum(-1), torch.ones(int(real.sum())))
    assert (scores[~real] == 0).all()
    # The shorter captions' extra steps must not reach the gradients either (a NaN there once did).
    loss = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=1.0)[0]
    terms = losses.hard_attention_terms(scores, captions, decode_lengths, alphas, locations, None, 0.1, 0.01)[0]
    gradients = torch.autograd.grad(loss + terms, list(decoder.parameters()))
    assert all(g.isfinite().all() for g in gradients) and any(g.abs().sum() > 0 for g in gradients)
