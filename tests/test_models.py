"""Shapes, attention, loss masking, gradients and checkpoints of the model, at tiny sizes."""
import pytest
import torch

import checkpoints
import losses
from models import DecoderWithAttention, Encoder

VOCAB = 20
START, END, PAD = 18, 19, 0


def tiny_decoder(encoder_dim=12, dropout=0.0):
    torch.manual_seed(0)
    return DecoderWithAttention(vocab_size=VOCAB, encoder_dim=encoder_dim, attention_dim=8, embed_dim=6,
                                decoder_dim=10, dropout=dropout)


def random_captions(lengths, max_len=9):
    """<start> words <end> <pad>... rows for the given total lengths (start and end included)."""
    g = torch.Generator().manual_seed(1)
    caps = torch.full((len(lengths), max_len), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        caps[i, 0] = START
        caps[i, 1:n - 1] = torch.randint(1, 18, (n - 2,), generator=g)
        caps[i, n - 1] = END
    return caps, torch.tensor(lengths)


@pytest.mark.parametrize("arch,cut,dim", [("resnet18", "layer2", 128), ("resnet50", "layer4", 2048)])
def test_encoder_output_shape(arch, cut, dim):
    encoder = Encoder(arch=arch, encoded_size=3, pretrained=False, cut_after=cut)
    out = encoder(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 9, dim) and encoder.encoder_dim == dim


def test_encoder_fine_tuning_trains_blocks_2_to_4_only_when_pretrained():
    # load_weights=False with pretrained=True: built as an ImageNet-initialised encoder, no download.
    encoder = Encoder(arch="resnet18", pretrained=True, fine_tune=True, load_weights=False)
    trainable = {name.split(".")[1] for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"5", "6", "7"}  # layer2, layer3, layer4 in the Sequential
    frozen = Encoder(arch="resnet18", pretrained=True, fine_tune=False, load_weights=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    scratch = Encoder(arch="resnet18", pretrained=False, fine_tune=True)
    assert all(p.requires_grad for p in scratch.parameters())


def test_frozen_encoder_keeps_batchnorm_statistics():
    encoder = Encoder(arch="resnet18", pretrained=True, fine_tune=False, load_weights=False).train()
    before = encoder.resnet[1].running_mean.clone()
    encoder(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert torch.equal(before, encoder.resnet[1].running_mean)


def test_attention_weights_sum_to_one_over_pixels():
    decoder = tiny_decoder()
    features = torch.randn(3, 7, 12)
    _, alphas, decode_lengths = decoder(features, *random_captions([5, 9, 3]))
    for i, n in enumerate(decode_lengths.tolist()):
        torch.testing.assert_close(alphas[i, :n].sum(dim=1), torch.ones(n))
        assert torch.all(alphas[i, n:] == 0)


def test_decoder_shapes_and_batch_order():
    decoder = tiny_decoder()
    features = torch.randn(3, 7, 12)
    captions, lengths = random_captions([5, 9, 3])
    scores, alphas, decode_lengths = decoder(features, captions, lengths)
    assert scores.shape == (3, 8, VOCAB) and alphas.shape == (3, 8, 7)
    assert decode_lengths.tolist() == [4, 8, 2]
    # The decoder sorts by length internally; rows must come back in the caller's order.
    perm = torch.tensor([2, 0, 1])
    scores_p, _, _ = decoder(features[perm], captions[perm], lengths[perm])
    torch.testing.assert_close(scores_p, scores[perm])


def test_pad_tokens_do_not_change_the_loss():
    decoder = tiny_decoder()
    features = torch.randn(3, 7, 12)
    captions, lengths = random_captions([5, 9, 3])
    loss, _, _ = losses.caption_loss(*_forward(decoder, features, captions, lengths), alpha_c=1.0)
    noisy = captions.clone()
    for i, n in enumerate(lengths.tolist()):
        noisy[i, n:] = torch.randint(1, 18, (captions.shape[1] - n,))
    wider = torch.cat([noisy, torch.full((3, 4), PAD)], dim=1)
    loss_noisy, _, _ = losses.caption_loss(*_forward(decoder, features, wider, lengths), alpha_c=1.0)
    torch.testing.assert_close(loss, loss_noisy)


def _forward(decoder, features, captions, lengths):
    scores, alphas, decode_lengths = decoder(features, captions, lengths)
    return scores, captions, decode_lengths, alphas


def test_every_trainable_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    encoder = Encoder(arch="resnet18", encoded_size=4, pretrained=False, fine_tune=True, cut_after="layer2")
    decoder = DecoderWithAttention(vocab_size=VOCAB, encoder_dim=encoder.encoder_dim, attention_dim=8,
                                   embed_dim=6, decoder_dim=10, dropout=0.5)
    captions, lengths = random_captions([5, 9, 3, 4])
    scores, alphas, decode_lengths = decoder(encoder(torch.randn(4, 3, 32, 32)), captions, lengths)
    loss, _, _ = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=1.0)
    loss.backward()
    for name, p in list(encoder.named_parameters()) + list(decoder.named_parameters()):
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    args = {"encoder_arch": "resnet18", "encoder_cut_after": "layer2", "encoded_size": 4, "attention_dim": 8,
            "embed_dim": 6, "decoder_dim": 10, "dropout": 0.5, "pretrained": False, "encoder_weights": None,
            "fine_tune_encoder": True}
    word_map = {"<pad>": 0, "a": 1, "<unk>": 2, "<start>": 3, "<end>": 4}
    encoder, decoder = checkpoints.build_models(args, len(word_map))
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(path, {"format_version": checkpoints.CHECKPOINT_VERSION, "encoder": encoder.state_dict(),
                                 "decoder": decoder.state_dict(), "args": args, "word_map": word_map,
                                 "image_size": 32})
    state = torch.load(path, weights_only=True)
    assert state["word_map"] == word_map and state["args"] == args
    encoder2, decoder2, _ = checkpoints.models_from_checkpoint(path, torch.device("cpu"))
    for a, b in zip(list(encoder.state_dict().values()) + list(decoder.state_dict().values()),
                    list(encoder2.state_dict().values()) + list(decoder2.state_dict().values())):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_attention_penalty_value_and_gradient_by_hand():
    # One caption of 2 steps over 3 pixels; each pixel's attention summed over the steps: 0.6, 0.4, 1.0.
    alphas = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], requires_grad=True)  # (1, 2, 3)
    penalty = losses.attention_penalty(alphas)  # (1,)
    # eq. 14: sum over pixels of (1 - sum over steps)^2, here averaged over the 3 pixels.
    assert penalty.shape == (1,) and penalty.item() == pytest.approx((0.4 ** 2 + 0.6 ** 2 + 0.0) / 3)
    penalty.sum().backward()
    # d/d alpha_tp = -2 (1 - sum_t alpha_tp) / P: the same at both steps, pushing under-attended pixels up.
    expected = torch.tensor([-2 * 0.4 / 3, -2 * 0.6 / 3, 0.0]).expand(2, 3)
    torch.testing.assert_close(alphas.grad[0], expected)


def test_the_penalty_enters_the_loss_with_weight_alpha_c_and_punishes_staring_at_one_pixel():
    decoder = tiny_decoder()
    features = torch.randn(3, 7, 12)
    captions, lengths = random_captions([5, 9, 3])
    scores, alphas, decode_lengths = decoder(features, captions, lengths)
    without = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=0.0)[0]
    with_penalty = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=2.5)[0]
    torch.testing.assert_close(with_penalty - without, 2.5 * losses.attention_penalty(alphas).mean())
    # Attention spread so that every pixel gets 1 over the caption costs nothing; on one pixel, a lot.
    steps, pixels = 4, 4
    spread = torch.full((1, steps, pixels), 1.0 / steps)
    staring = torch.zeros(1, steps, pixels)
    staring[0, :, 0] = 1.0
    assert losses.attention_penalty(spread).item() == 0.0
    assert losses.attention_penalty(staring).item() == pytest.approx((9 + 1 + 1 + 1) / 4)


def test_the_decoder_does_not_depend_on_the_order_of_the_pixels():
    # Attention weighs the pixels and h0, c0 come from their mean: shuffling the grid permutes the
    # attention maps and changes nothing else, in training and in decoding.
    decoder = tiny_decoder()
    features = torch.randn(3, 7, 12)
    captions, lengths = random_captions([5, 9, 3])
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    scores, alphas, _ = decoder(features, captions, lengths)
    scores_p, alphas_p, _ = decoder(features[:, perm], captions, lengths)
    torch.testing.assert_close(scores_p, scores)
    torch.testing.assert_close(alphas_p, alphas[:, :, perm])
    tokens = decoder.beam_search(features, START, END, beam_size=3, max_steps=6)
    assert decoder.beam_search(features[:, perm], START, END, beam_size=3, max_steps=6) == tokens


def test_initial_state_comes_from_the_mean_encoding():
    decoder = tiny_decoder()
    features = torch.randn(3, 7, 12)
    h, c = decoder.init_hidden_state(features)
    mean = features.mean(dim=1)
    torch.testing.assert_close(h, decoder.init_h(mean))
    torch.testing.assert_close(c, decoder.init_c(mean))


def test_validation_sums_give_the_training_loss():
    # One loss, two ways to take it: a batch's mean (training) and sums over a split (validation).
    decoder = tiny_decoder()
    features = torch.randn(4, 7, 12)
    captions, lengths = random_captions([5, 9, 3, 6])
    scores, alphas, decode_lengths = decoder(features, captions, lengths)
    loss = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=0.7)[0]
    halves = [losses.caption_loss_sums(scores[rows], captions[rows], decode_lengths[rows], alphas[rows])
              for rows in (slice(0, 1), slice(1, 4))]
    sums = {key: halves[0][key] + halves[1][key] for key in halves[0]}
    assert sums["words"] == int(decode_lengths.sum()) and sums["captions"] == 4
    assert losses.loss_from_sums(sums, alpha_c=0.7) == pytest.approx(loss.item(), rel=1e-6)
