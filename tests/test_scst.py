"""Self-critical training (scst.py): sampling, advantages, one update's direction, exact resume, a
tiny run whose reward rises, each sample's reward against its own image's references, and one update
on two torchrun processes against one process. Runs start from the session's tiny cross-entropy model
(trained_run)."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
import scst
import scst_worker
from checkpoints import load_checkpoint, models_from_checkpoint
from cider import CiderD, split_references
from datasets import CaptionDataset

REPO = Path(__file__).resolve().parents[1]


def scst_args(trained_run, packed_data, out, *extra):
    """scst.py arguments for a short run on the tiny packed set."""
    return [str(a) for a in ["--checkpoint", trained_run / "best.pt", "--data-folder", packed_data,
                             "--output-dir", out, "--workers", 0, "--batch-size", 8, "--steps-per-epoch", 2,
                             "--epochs", 1, "--log-images", 0, *extra]]  # figures: tests/test_watching.py


def test_mean_baseline_advantages_of_an_image_sum_to_zero():
    rewards = torch.rand(4 * 5)  # (B*S,)
    advantage, baselines = scst.advantages(rewards, None, 5, "mean")
    torch.testing.assert_close(advantage.view(4, 5).sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    # Each sample is compared with the mean of the image's other four.
    per_image = rewards.view(4, 5)
    assert float(baselines[1]) == pytest.approx(float((per_image[0].sum() - per_image[0, 1]) / 4))
    greedy = torch.tensor([0.5, 1.0, 0.0, 2.0])
    advantage, _ = scst.advantages(rewards, greedy, 5, "greedy")
    torch.testing.assert_close(advantage, rewards - greedy.repeat_interleave(5))


def test_sampling_stops_at_end_and_at_the_length_cap():
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(vocab_size=12, encoder_dim=8, attention_dim=6, embed_dim=5,
                                          decoder_dim=7, dropout=0.0)
    features = torch.randn(6, 4, 8)
    with torch.no_grad():
        decoder.fc.bias[11] = 1.5  # <end> (11) likely enough that samples end at many lengths
    words, log_probs, counted = scst.sample_captions(decoder, features, 10, 11, num_samples=4, max_length=9)
    assert words.shape == log_probs.shape == counted.shape and words.shape[0] == 24 and words.shape[1] <= 9
    for row, kept in zip(words.tolist(), counted.tolist()):
        ended_before = [11 in row[:t] for t in range(len(row))]
        assert kept == [not e for e in ended_before]  # words up to and including the first <end>
    lengths = counted.sum(dim=1)
    assert len(set(lengths.tolist())) > 2
    assert log_probs.requires_grad and bool((log_probs <= 0).all())
    with torch.no_grad():
        decoder.fc.bias[11] = -1e4  # never ends: every sample runs to the cap
    words, _, counted = scst.sample_captions(decoder, features, 10, 11, num_samples=2, max_length=9)
    assert words.shape == (12, 9) and bool(counted.all())


def caption_log_probs(decoder, features, rows, start_token):
    """Summed log-probability of each token row (N, T), <end> included, given features (N, P, E):
    the teacher-forced pass, in the decoder's current mode."""
    start = torch.full((rows.shape[0], 1), start_token, dtype=torch.long)
    captions = torch.cat([start, rows], dim=1)  # (N, T+1)
    lengths = torch.full((rows.shape[0],), captions.shape[1])
    scores, _, _ = decoder(features, captions, lengths)  # (N, T, V)
    return F.log_softmax(scores, dim=2).gather(2, rows.unsqueeze(2)).squeeze(2).sum(dim=1)  # (N,)


def fixed_samples(packed_data, word_map):
    """Three 'samples' per image: the start of its first reference caption (clearly the best), and two
    of <unk> only, which no reference has; token rows of equal length, each ending in <end>."""
    dataset = CaptionDataset(packed_data, "train", per_image=True)
    rows = {}
    for i in range(len(dataset)):
        _, captions, lengths, _ = dataset[i]
        words = captions[0, 1:int(lengths[0]) - 1][:4].tolist()
        words += [words[0]] * (4 - len(words))
        unk, end = word_map["<unk>"], word_map["<end>"]
        rows[i] = [words + [end], [unk] * 4 + [end], [unk] * 4 + [end]]
    return rows


def test_one_step_makes_the_best_sample_likelier_and_the_others_less_likely(trained_run, packed_data, tmp_path,
                                                                            monkeypatch):
    encoder, decoder, state = models_from_checkpoint(trained_run / "best.pt", torch.device("cpu"))
    rows = fixed_samples(packed_data, state["word_map"])
    batch_indices = []

    def fixed_sampler(decoder, encoder_out, start, end, num_samples, max_length):
        index = batch_indices[-1]
        tokens = torch.tensor([r for i in index for r in rows[i]])  # (B*3, 5)
        features = encoder_out.repeat_interleave(3, dim=0)  # (B*3, P, E)
        scores, _, _ = decoder(features, torch.cat([torch.full((len(tokens), 1), start), tokens], 1),
                               torch.full((len(tokens),), 6))
        log_probs = F.log_softmax(scores, dim=2).gather(2, tokens.unsqueeze(2)).squeeze(2)  # (B*3, 5)
        return tokens, log_probs, torch.ones_like(tokens, dtype=torch.bool)

    step = scst.scst_step
    monkeypatch.setattr(scst, "sample_captions", fixed_sampler)
    monkeypatch.setattr(scst, "scst_step", lambda run, images, indices, *a: (
        batch_indices.append(indices.tolist()), step(run, images, indices, *a))[1])
    scst.main(scst_args(trained_run, packed_data, tmp_path, "--scst-samples", 3, "--scst-baseline", "mean",
                        "--steps-per-epoch", 1, "--decoder-lr", 1e-3, "--seed", 1))
    _, after, _ = models_from_checkpoint(tmp_path / "last.pt", torch.device("cpu"))
    dataset = CaptionDataset(packed_data, "train", per_image=True)
    index = batch_indices[0]
    with torch.no_grad():
        features = encoder(torch.stack([dataset[i][0] for i in index])).repeat_interleave(3, dim=0)
        tokens = torch.tensor([r for i in index for r in rows[i]])
        start = state["word_map"]["<start>"]
        change = (caption_log_probs(after, features, tokens, start)
                  - caption_log_probs(decoder, features, tokens, start)).view(-1, 3)  # (B, 3)
    assert float(change[:, 0].mean()) > 0  # the reference-like caption, rewarded most
    assert float(change[:, 1:].mean()) < 0  # the <unk> ones, rewarded 0
    assert float(change[:, 0].mean()) > float(change[:, 1].mean()) and float(change[:, 0].mean()) > float(
        change[:, 2].mean())


def read_rows(path):
    """metrics.csv rows without their timing."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_resume_mid_epoch_matches_an_uninterrupted_run(trained_run, packed_data, tmp_path, monkeypatch):
    whole = scst_args(trained_run, packed_data, tmp_path / "whole", "--steps-per-epoch", 4, "--epochs", 2)
    scst.main(whole)
    # The same run, stopped by SIGTERM after its third step (mid-epoch), then resumed.
    parts = scst_args(trained_run, packed_data, tmp_path / "parts", "--steps-per-epoch", 4, "--epochs", 2)
    step, calls = scst.scst_step, []

    def stopping_step(run, images, indices, number, stop, *captions):
        calls.append(number)
        if len(calls) == 3:
            stop.signal = signal.SIGTERM
        return step(run, images, indices, number, stop, *captions)

    monkeypatch.setattr(scst, "scst_step", stopping_step)
    with pytest.raises(SystemExit) as exit_info:
        scst.main(parts)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "parts" / "last.pt")["samples_done"] == 3 * 8
    monkeypatch.undo()
    scst.main(parts + ["--resume", str(tmp_path / "parts" / "last.pt")])
    whole_state, parts_state = (load_checkpoint(tmp_path / d / "last.pt") for d in ("whole", "parts"))
    for key, value in whole_state["decoder"].items():
        torch.testing.assert_close(parts_state["decoder"][key], value, atol=0, rtol=0)
    assert read_rows(tmp_path / "whole" / "metrics.csv") == read_rows(tmp_path / "parts" / "metrics.csv")
    assert whole_state["cider"] == parts_state["cider"] and whole_state["scst"]


def test_a_tiny_run_raises_the_training_reward_and_evaluates(trained_run, packed_data, tmp_path):
    import eval as eval_script

    history = scst.main(scst_args(trained_run, packed_data, tmp_path, "--epochs", 4, "--steps-per-epoch", 6,
                                  "--batch-size", 16, "--decoder-lr", 1e-3))
    rewards = [row["train_reward"] for row in history]
    assert rewards[-1] > rewards[0] * 1.1, rewards
    assert {"train_reward", "train_baseline", "val_decoded_cider"} <= history[0].keys()
    best = max(history, key=lambda row: row["val_decoded_cider"])
    assert load_checkpoint(tmp_path / "best.pt")["best_cider"] == best["val_decoded_cider"]
    metrics = eval_script.main(["--checkpoint", str(tmp_path / "best.pt"), "--data-folder", str(packed_data),
                                "--workers", "0", "--no-coco-metrics"])
    assert metrics["images"] > 0


def test_a_cross_entropy_checkpoint_cannot_be_resumed_as_scst(trained_run, packed_data, tmp_path, capsys):
    from utils import UserError

    with pytest.raises(UserError, match="not a checkpoint of scst.py"):
        scst.main(scst_args(trained_run, packed_data, tmp_path, "--resume", trained_run / "best.pt"))


def test_a_run_cannot_be_resumed_with_another_reward(trained_run, packed_data, tmp_path):
    from utils import UserError

    scst.main(scst_args(trained_run, packed_data, tmp_path, "--steps-per-epoch", 1, "--reward-against", "closest"))
    with pytest.raises(UserError, match="trained with --reward-against closest; pass the same"):
        scst.main(scst_args(trained_run, packed_data, tmp_path, "--epochs", 2, "--resume", tmp_path / "last.pt"))
    assert len(scst.main(scst_args(trained_run, packed_data, tmp_path, "--epochs", 2, "--steps-per-epoch", 1,
                                   "--reward-against", "closest", "--resume", tmp_path / "last.pt"))) == 2


# ----------------------------------------------------------------------------------------------
# Which references a sample is rewarded against, and one update on two processes


def test_each_sample_is_drawn_from_its_own_images_features():
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(vocab_size=12, encoder_dim=8, attention_dim=6, embed_dim=5,
                                          decoder_dim=7, dropout=0.0).eval()
    features = torch.randn(3, 4, 8) * 2  # (B, P, E): three images that the decoder tells apart
    words, log_probs, _ = scst.sample_captions(decoder, features, 10, 11, num_samples=4, max_length=6)
    # The oracle: the teacher-forced pass of each sample's words on the features of its image, the
    # samples of an image being consecutive rows.
    own_features = features[torch.arange(3).repeat_interleave(4)]  # (B*S, P, E)
    with torch.no_grad():
        captions = F.pad(words, (1, 0), value=10)
        scores, _, _ = decoder(own_features, captions, torch.full((12,), captions.shape[1]))
    expected = F.log_softmax(scores, dim=2).gather(2, words.unsqueeze(2)).squeeze(2)  # (B*S, T)
    torch.testing.assert_close(log_probs.detach(), expected)


SAME_UPDATE = ["--scst-samples", 2, "--scst-baseline", "mean", "--grad-clip", 0, "--max-sample-length", 6,
               "--seed", 3]


@pytest.fixture(scope="module")
def one_process_update(trained_run, packed_data, tmp_path_factory):
    """What scst_worker.record_first_update records of one process's first step, 4 images a step."""
    record = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        handle = scst_worker.record_first_update(monkeypatch.setattr, record, packed_data)
        try:
            scst.main(scst_args(trained_run, packed_data, tmp_path_factory.mktemp("scst_one"), "--batch-size", 4,
                                "--steps-per-epoch", 1, *SAME_UPDATE))
        finally:
            handle.remove()
    return record


def test_each_sample_is_rewarded_against_its_own_images_references(one_process_update, packed_data):
    record = one_process_update
    references = split_references(packed_data, "train")
    scorer = CiderD.from_references(references)
    rev_word_map = {v: k for k, v in json.loads((packed_data / "word_map.json").read_text()).items()}
    end = json.loads((packed_data / "word_map.json").read_text())["<end>"]
    samples = scst.caption_words(torch.tensor(record["tokens"]), end, rev_word_map)
    owners = [i for i in record["indices"] for _ in range(2)]  # 2 samples per image, in a row
    rewards = [scorer.score(words, references[i]) for words, i in zip(samples, owners)]
    assert record["reward"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-6)
    # Paired with another image's references, the same samples would earn other rewards.
    assert len({tuple(map(tuple, references[i])) for i in record["indices"]}) == 4
    assert max(rewards) > 0


def test_reward_against_closest_scores_samples_and_validation_by_the_best_matched_reference(
        trained_run, packed_data, tmp_path, monkeypatch):
    record, validated_closest = {}, []
    corpus_score = CiderD.corpus_score

    def recording_corpus_score(self, hypotheses, references, closest=False):
        validated_closest.append(closest)
        return corpus_score(self, hypotheses, references, closest)

    monkeypatch.setattr(CiderD, "corpus_score", recording_corpus_score)
    handle = scst_worker.record_first_update(monkeypatch.setattr, record, packed_data)
    try:
        scst.main(scst_args(trained_run, packed_data, tmp_path, "--batch-size", 4, "--steps-per-epoch", 1,
                            *SAME_UPDATE, "--reward-against", "closest"))
    finally:
        handle.remove()
    references = split_references(packed_data, "train")
    scorer = CiderD.from_references(references)
    word_map = json.loads((packed_data / "word_map.json").read_text())
    samples = scst.caption_words(torch.tensor(record["tokens"]), word_map["<end>"], {v: k for k, v in word_map.items()})
    owners = [references[i] for i in record["indices"] for _ in range(2)]  # 2 samples per image, in a row
    closest = [scorer.score(words, refs, closest=True) for words, refs in zip(samples, owners)]
    mean_of_all = [scorer.score(words, refs) for words, refs in zip(samples, owners)]
    assert record["reward"] == pytest.approx(sum(closest) / len(closest), rel=1e-6)
    assert sum(closest) > sum(mean_of_all)  # the references differ: the closest one scores higher
    assert validated_closest == [True]  # best.pt is picked by the same score


def test_one_update_on_two_processes_equals_one_process_on_both_batches(one_process_update, trained_run,
                                                                        packed_data, tmp_path):
    # Sampling is not a forward() that DDP could hook, so scst.py averages the gradients itself: under
    # torchrun, 2 processes of 2 images each must apply the gradient one process computes on all 4.
    out, dump = tmp_path / "run", tmp_path / "dump"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tests/scst_worker.py", "--dump", str(dump), "--",
               *scst_args(trained_run, packed_data, out, "--epochs", 2, "--steps-per-epoch", 1, "--batch-size", 2,
                          *SAME_UPDATE)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    single = one_process_update
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == sorted(single["indices"])
    assert len(single["grads"]) == len(ranks[0]["grads"]) > 0
    assert any(bool(g.abs().sum() > 0) for g in single["grads"])
    for on_rank0, on_rank1, on_one in zip(ranks[0]["grads"], ranks[1]["grads"], single["grads"]):
        torch.testing.assert_close(on_rank0, on_rank1, rtol=0, atol=0)  # every process applies the same
        torch.testing.assert_close(on_rank0, on_one, rtol=1e-4, atol=1e-7)  # the mean, not the sum

    # The run goes on to the end, and only rank 0 writes its files.
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(math.isfinite(float(r["train_reward"])) for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "best.pt", "curves.png", "last.pt", "metrics.csv",
                                                     "tensorboard"]
    assert len(list((out / "tensorboard").iterdir())) == 1  # rank 0's event file
    assert json.loads((out / "args.json").read_text())["world_size"] == 2


def test_the_reference_loss_pairs_each_caption_with_its_own_image(trained_run, packed_data):
    encoder, decoder, _ = models_from_checkpoint(trained_run / "best.pt", torch.device("cpu"))
    dataset = CaptionDataset(packed_data, "train", per_image=True)
    images, captions, lengths, _ = zip(*(dataset[i] for i in (0, 5, 9)))
    captions, lengths = torch.stack(captions), torch.stack(lengths)  # (3, C, L), (3, C)
    with torch.no_grad():
        features = encoder(torch.stack(images))  # (3, P, E)
        loss = scst.reference_loss(decoder, features, captions, lengths, alpha_c=0.0)
        # Oracle: each caption alone beside its own image, its words' cross-entropy summed, then the mean
        # over every word of the batch (train.py's loss: a mean over words, not over captions).
        total, words = 0.0, 0
        for image, image_captions, image_lengths in zip(features, captions, lengths):
            for caption, length in zip(image_captions, image_lengths):
                scores, _, _ = decoder(image[None], caption[None], length[None])  # (1, T, V)
                targets = caption[1:int(length)]  # every word after <start>, <end> included
                total += float(F.cross_entropy(scores[0, :len(targets)], targets, reduction="sum"))
                words += len(targets)
    assert float(loss) == pytest.approx(total / words, rel=1e-5)


def test_xe_weight_fits_each_images_references_in_turn(trained_run, packed_data, tmp_path, monkeypatch):
    seen = []  # per step: the batch's image indices, then the captions the reference loss was given
    original_step, original_loss = scst.scst_step, scst.reference_loss

    def recording_step(run, images, indices, *rest):
        seen.append([indices.clone()])
        return original_step(run, images, indices, *rest)

    def recording_loss(decoder, features, captions, lengths, alpha_c):
        seen[-1] += [captions.clone(), lengths.clone()]
        return original_loss(decoder, features, captions, lengths, alpha_c)

    monkeypatch.setattr(scst, "scst_step", recording_step)
    monkeypatch.setattr(scst, "reference_loss", recording_loss)
    scst.main(scst_args(trained_run, packed_data, tmp_path / "run", "--batch-size", 4, "--steps-per-epoch", 3,
                        "--epochs", 2, "--xe-weight", 0.5, *SAME_UPDATE))
    dataset = CaptionDataset(packed_data, "train", per_image=True)
    per_image = dataset[0][1].shape[0]  # C
    assert len(seen) == 6 and per_image > 1
    for step, (indices, captions, lengths) in enumerate(seen):  # steps counted over both epochs
        expected = [dataset[i] for i in indices.tolist()]
        assert captions.shape == (len(indices), expected[0][1].shape[1])  # one caption per image: (B, L)
        assert torch.equal(captions, torch.stack([e[1][step % per_image] for e in expected]))
        assert torch.equal(lengths, torch.stack([e[2][step % per_image] for e in expected]))


def test_xe_weight_adds_that_weight_of_the_reference_loss_gradient(trained_run, packed_data, tmp_path):
    grads = {}
    for weight in (0, 1, 3):
        record = {}
        with pytest.MonkeyPatch.context() as monkeypatch:
            handle = scst_worker.record_first_update(monkeypatch.setattr, record, packed_data)
            try:
                scst.main(scst_args(trained_run, packed_data, tmp_path / f"w{weight}", "--batch-size", 4,
                                    "--steps-per-epoch", 1, "--xe-weight", weight, *SAME_UPDATE))
            finally:
                handle.remove()
        grads[weight] = record["grads"]
    # The same samples and dropout masks in all three runs: the gradients differ by the weighted term alone.
    added = [one - none for one, none in zip(grads[1], grads[0])]
    assert max(float(a.abs().max()) for a in added) > 1e-4
    for three, none, one in zip(grads[3], grads[0], added):
        torch.testing.assert_close(three - none, 3 * one, rtol=1e-4, atol=1e-6)
