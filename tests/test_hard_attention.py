"""Hard (stochastic) attention and the deep output layer: the training terms of section 4.1 on
constructed cases, the hard model against the soft one, eq. 7's shapes and gradients, checkpoints,
and a tiny run through train.py (exact resume, the choices recorded and enforced); tests/test_quality.py
checks that a short hard-attention run beats the content-free baseline."""
import math

import pytest
import torch

import checkpoints
import losses
import train
from conftest import TINY_MODEL
from models import DecoderWithAttention

DIMS = dict(vocab_size=30, encoder_dim=16, attention_dim=8, embed_dim=6, decoder_dim=10, dropout=0.0)


def batch():
    """Features (5, 9, 16) and captions of 5 lengths (<start> 28, <end> 29, <pad> 0) for DIMS."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 9, 16, generator=g)
    lengths = torch.tensor([4, 11, 7, 7, 3])
    captions = torch.randint(1, 28, (5, 12), generator=g)
    captions[:, 0] = 28
    for i, n in enumerate(lengths.tolist()):
        captions[i, n - 1], captions[i, n:] = 29, 0
    return features, captions, lengths


def decoder(**options):
    torch.manual_seed(0)
    return DecoderWithAttention(**{**DIMS, **options})


# ----------------------------------------------------------------------------------------------
# Section 4.1's training terms, on constructed cases


def one_step_on_attention(logits, locations, scores, captions, decode_lengths, baseline, reinforce_weight,
                          entropy_weight, lr=0.5):
    """The attention distribution softmax(logits) (B, T, P) after one SGD step on the hard terms."""
    logits = logits.clone().requires_grad_(True)
    term, _, _ = losses.hard_attention_terms(scores, captions, decode_lengths, logits.softmax(dim=2), locations,
                                             baseline, reinforce_weight, entropy_weight)
    term.backward()
    with torch.no_grad():
        return (logits - lr * logits.grad).softmax(dim=2)


def test_reinforce_raises_the_probability_of_the_location_that_explains_the_caption_better():
    # Two captions of one word over one image with 3 cells, the same attention for both. Caption 0
    # read cell 0 and gave its word probability 0.9; caption 1 read cell 2 and gave 0.1. With the
    # baseline between them, one step must move probability from cell 2 to cell 0.
    captions = torch.tensor([[28, 5, 29], [28, 5, 29]])
    decode_lengths = torch.tensor([1, 1])
    scores = torch.full((2, 1, 30), -20.0)
    scores[0, 0, 5], scores[0, 0, 6] = math.log(0.9), math.log(0.1)
    scores[1, 0, 5], scores[1, 0, 6] = math.log(0.1), math.log(0.9)
    rewards = losses.caption_log_likelihoods(scores, captions, decode_lengths)
    assert rewards[0] > rewards[1]
    logits = torch.zeros(2, 1, 3)
    locations = torch.tensor([[0], [2]])
    after = one_step_on_attention(logits, locations, scores, captions, decode_lengths, float(rewards.mean()),
                                  reinforce_weight=1.0, entropy_weight=0.0)
    assert after[0, 0, 0] > 1 / 3 > after[0, 0, 2]
    # Each alone: above the baseline its cell gains, below it its cell loses.
    for caption, cell, gains in ((0, 0, True), (1, 2, False)):
        alone = one_step_on_attention(logits[caption:caption + 1], locations[caption:caption + 1],
                                      scores[caption:caption + 1], captions[caption:caption + 1],
                                      decode_lengths[caption:caption + 1], float(rewards.mean()), 1.0, 0.0)
        assert (alone[0, 0, cell] > 1 / 3) == gains


def test_the_entropy_term_raises_the_entropy_of_the_attention():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 9, generator=g) * 3  # peaked
    captions = torch.randint(1, 28, (3, 6), generator=g)
    decode_lengths = torch.tensor([4, 4, 4])
    scores = torch.randn(3, 4, 30, generator=g)
    locations = torch.randint(0, 9, (3, 4), generator=g)

    def entropy(alphas):
        return float(-(alphas * alphas.log()).sum(dim=2).mean())

    after = one_step_on_attention(logits, locations, scores, captions, decode_lengths, 0.0,
                                  reinforce_weight=0.0, entropy_weight=1.0, lr=2.0)
    assert entropy(after) > entropy(logits.softmax(dim=2)) + 1e-3
    # Steps that read the expectation (location -1) get no entropy term: nothing moves.
    unchanged = one_step_on_attention(logits, torch.full_like(locations, -1), scores, captions, decode_lengths,
                                      0.0, reinforce_weight=1.0, entropy_weight=1.0)
    torch.testing.assert_close(unchanged, logits.softmax(dim=2))


def test_the_baseline_is_a_moving_average_of_the_log_likelihood():
    assert losses.updated_baseline(None, -12.0, 4, 0.9) == -3.0  # the first batch starts it at its mean
    assert losses.updated_baseline(-3.0, -20.0, 4, 0.9) == pytest.approx(0.9 * -3.0 + 0.1 * -5.0)
    assert losses.updated_baseline(-3.0, 0.0, 0, 0.9) == -3.0  # no caption sampled: unchanged


def loss_and_gradients(model, features, captions, lengths, hard_terms=True):
    """The training objective of one teacher-forced pass and {name: gradient}."""
    model.zero_grad()
    scores, alphas, decode_lengths, locations = model(features, captions, lengths, return_locations=True)
    loss, _, _ = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=1.0)
    if hard_terms:
        term, _, _ = losses.hard_attention_terms(scores, captions, decode_lengths, alphas, locations, -10.0,
                                                 reinforce_weight=0.1, entropy_weight=0.01)
        loss = loss + term
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, locations


@pytest.mark.parametrize("output_layer", ["linear", "deep"])
def test_hard_attention_always_reading_the_expectation_is_the_soft_model(output_layer):
    features, captions, lengths = batch()
    soft = decoder(output_layer=output_layer).train()
    hard = decoder(output_layer=output_layer, attention="hard", hard_expectation_prob=1.0).train()
    hard.load_state_dict(soft.state_dict())
    soft_loss, soft_grads, _ = loss_and_gradients(soft, features, captions, lengths, hard_terms=False)
    hard_loss, hard_grads, locations = loss_and_gradients(hard, features, captions, lengths)
    assert (locations == -1).all()
    torch.testing.assert_close(hard_loss, soft_loss)
    assert hard_grads.keys() == soft_grads.keys()
    for name in soft_grads:
        torch.testing.assert_close(hard_grads[name], soft_grads[name], msg=name)
    # Sampling, the same model differs: it reads one cell per step.
    hard.hard_expectation_prob = 0.0
    sampled_loss, _, locations = loss_and_gradients(hard, features, captions, lengths)
    real = torch.arange(locations.shape[1]) < (lengths - 1).unsqueeze(1)
    assert (locations[real] >= 0).all() and (locations[~real] == -1).all()
    assert not torch.isclose(sampled_loss, soft_loss)


def test_hard_attention_reads_the_sampled_cell_and_every_parameter_gets_a_gradient():
    features, captions, lengths = batch()
    model = decoder(attention="hard", hard_expectation_prob=0.0).train()
    encoder_out = features
    h, c = model.init_hidden_state(encoder_out)
    torch.manual_seed(5)
    step = model.step(encoder_out, model.project_encoder(encoder_out), model.embedding(captions[:, 0]), h, c)
    gate = torch.sigmoid(model.f_beta(h))
    chosen = features[torch.arange(5), step.location]  # (B, E): the cell each row sampled
    torch.testing.assert_close(step.context, gate * chosen)
    # Seeded: the same seed samples the same cells.
    torch.manual_seed(5)
    again = model.step(encoder_out, model.project_encoder(encoder_out), model.embedding(captions[:, 0]), h, c)
    assert torch.equal(again.location, step.location)

    _, grads, _ = loss_and_gradients(model, features, captions, lengths)
    missing = [n for n, p in model.named_parameters() if n not in grads or not torch.isfinite(grads[n]).all()]
    assert not missing, missing
    assert grads["attention.full_att.weight"].abs().sum() > 0  # through REINFORCE and the penalty alone


def test_a_hard_model_not_training_reads_the_argmax_cell_or_the_expectation():
    features, captions, lengths = batch()
    model = decoder(attention="hard").eval()
    h, c = model.init_hidden_state(features)
    inputs = (features, model.project_encoder(features), model.embedding(captions[:, 0]), h, c)
    step = model.step(*inputs)
    assert torch.equal(step.location, step.alpha.argmax(dim=1))
    model.hard_read = "expectation"
    expected = model.step(*inputs)
    assert (expected.location == -1).all()
    soft = decoder().eval()
    soft.load_state_dict(model.state_dict())
    torch.testing.assert_close(expected.context, soft.step(*inputs).context)


# ----------------------------------------------------------------------------------------------
# The deep output layer, eq. 7


def test_deep_output_layer_is_eq_7_with_its_shapes_and_gradients():
    model = decoder(output_layer="deep").eval()
    n = 7
    h, embeddings, context = torch.randn(n, 10), torch.randn(n, 6), torch.randn(n, 16)
    scores = model.output(h, embeddings, context)
    assert scores.shape == (n, 30)
    # L_o(E y_t-1 + L_h h_t + L_z z_t), with the tanh of the paper's code between them.
    expected = model.fc(torch.tanh(embeddings + model.deep_h(h) + model.deep_z(context)))
    torch.testing.assert_close(scores, expected)
    assert model.fc.weight.shape == (30, 6)  # L_o maps the embedding size to the words
    # The previous word and the context change the scores of the deep layer, not of the linear one.
    linear = decoder().eval()
    assert not torch.allclose(model.output(h, embeddings + 1, context), scores)
    assert not torch.allclose(model.output(h, embeddings, context + 1), scores)
    torch.testing.assert_close(linear.output(h, embeddings + 1, context + 1), linear.output(h, embeddings, context))

    features, captions, lengths = batch()
    for attention in ("soft", "hard"):
        model = decoder(output_layer="deep", attention=attention, dropout=0.5).train()
        scores, alphas, decode_lengths = model(features, captions, lengths)
        assert scores.shape == (5, 10, 30) and alphas.shape == (5, 10, 9)
        _, grads, _ = loss_and_gradients(model, features, captions, lengths, hard_terms=attention == "hard")
        for name in ("deep_h.weight", "deep_z.weight", "fc.weight", "embedding.weight", "f_beta.weight"):
            assert grads[name].abs().sum() > 0, (attention, name)


# ----------------------------------------------------------------------------------------------
# Checkpoints and tiny runs through the real scripts


def test_checkpoints_without_the_new_arguments_build_the_soft_linear_model():
    args = {"encoder_arch": "resnet18", "encoder_cut_after": "layer2", "encoded_size": 4, "attention_dim": 8,
            "embed_dim": 6, "decoder_dim": 10, "dropout": 0.5, "pretrained": False, "encoder_weights": None,
            "fine_tune_encoder": True}
    _, old = checkpoints.build_models(args, 9, load_weights=False)
    assert (old.attention_type, old.output_layer) == ("soft", "linear")
    _, new = checkpoints.build_models({**args, "attention": "hard", "output_layer": "deep"}, 9, load_weights=False)
    assert (new.attention_type, new.output_layer) == ("hard", "deep") and hasattr(new, "deep_z")
    assert {"attention", "output_layer"} <= set(checkpoints.ARCH_ARGS)


def hard_argv(data, out, *extra, epochs=2):
    argv = ["--data-folder", data, "--output-dir", out, "--epochs", epochs, "--decoder-lr", "3e-3",
            "--encoder-lr", "1e-3", *TINY_MODEL, "--attention", "hard", "--output-layer", "deep", *extra]
    return [str(a) for a in argv]


@pytest.fixture(scope="module")
def hard_run(packed_data, tmp_path_factory):
    """A 2-epoch hard-attention, deep-output tiny run on packed_data."""
    out = tmp_path_factory.mktemp("hard_run")
    train.main(hard_argv(packed_data, out))
    return out


def test_hard_run_resumes_exactly_and_records_its_choices(hard_run, packed_data, tmp_path):
    state = torch.load(hard_run / "last.pt", weights_only=True)
    assert state["args"]["attention"] == "hard" and state["args"]["output_layer"] == "deep"
    assert state["hard_baseline"] is not None and state["hard_baseline"] < 0  # a log-likelihood
    assert "hard_baseline" in (hard_run / "metrics.csv").read_text().splitlines()[0]
    first = tmp_path / "first"
    train.main(hard_argv(packed_data, first, epochs=1))
    train.main(hard_argv(packed_data, first, "--resume", first / "last.pt"))
    resumed = torch.load(first / "last.pt", weights_only=True)
    # The sampled cells, the dropout masks and the baseline all continued where they stopped.
    assert resumed["hard_baseline"] == state["hard_baseline"]
    for part in ("encoder", "decoder"):
        for name, tensor in state[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name}"


@pytest.mark.parametrize("change", [["--attention", "soft"], ["--output-layer", "linear"]])
def test_resume_refuses_another_attention_or_output_layer(hard_run, packed_data, tmp_path, change):
    argv = hard_argv(packed_data, tmp_path / "run", "--resume", hard_run / "last.pt", epochs=3)
    argv[argv.index(change[0]) + 1] = change[1]
    with pytest.raises(train.UserError) as error:
        train.main(argv)
    flag = change[0]
    assert f"{flag} {'hard' if flag == '--attention' else 'deep'} (checkpoint) vs {change[1]}" in str(error.value)



def test_a_checkpoint_from_before_these_flags_resumes_as_soft_and_linear_only():
    saved = {"encoder_arch": "resnet18", "encoder_cut_after": "layer2", "encoded_size": 8, "attention_dim": 32,
             "embed_dim": 16, "decoder_dim": 32}
    args = train.parse_args(["--data-folder", "x", *TINY_MODEL])
    train.check_resume_compatible({"args": saved}, args, "old.pt")  # the defaults: accepted
    args.attention = "hard"
    with pytest.raises(train.UserError, match=r"--attention soft \(checkpoint\) vs hard \(now\)"):
        train.check_resume_compatible({"args": saved}, args, "old.pt")


def test_caption_marks_the_cell_a_hard_model_read(hard_run, shapes_raw, tmp_path, monkeypatch):
    import caption

    drawn = []
    monkeypatch.setattr(caption, "attention_figure", lambda *a, **k: drawn.append(a))
    image = sorted((shapes_raw / "images").iterdir())[0]
    for read in ("argmax", "expectation"):
        caption.main(["--img", str(image), "--checkpoint", str(hard_run / "best.pt"), "--out",
                      str(tmp_path / f"{read}.png"), "--hard-read", read])
    assert [a[-1] for a in drawn] == [True, False]  # the cell read is marked; the expectation is a map
    monkeypatch.undo()
    out = tmp_path / "figure.png"
    caption.main(["--img", str(image), "--checkpoint", str(hard_run / "best.pt"), "--out", str(out)])
    assert out.stat().st_size > 0


def test_the_attention_penalty_is_soft_attention_s_unless_asked_for():
    # Section 4.2.1's doubly stochastic penalty is part of the soft model's objective (eq. 14) only.
    base = ["--data-folder", "d"]
    assert train.parse_args(base).alpha_c == 1.0
    assert train.parse_args(base + ["--attention", "hard"]).alpha_c == 0.0
    assert train.parse_args(base + ["--attention", "hard", "--alpha-c", "0.5"]).alpha_c == 0.5
