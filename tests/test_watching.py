"""Watching a run: the TensorBoard event files of train.py and scst.py read back with tensorboard's
own reader (tags, steps in captions trained on, images, captions), resume after SIGKILL, a disk that
refuses the logs, and plot_metrics.py's curves.png."""
import csv
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import plot_metrics
import scst
import train
from checkpoints import models_from_checkpoint
from conftest import TINY_MODEL
from datasets import CaptionDataset, decode_tokens
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
EVERY_FIGURE = {"scalars": 0, "images": 0, "tensors": 0}  # the reader keeps all events, not a sample


def read_events(run_dir):
    """The run's event files as TensorBoard shows them (restarts purged)."""
    accumulator = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance=EVERY_FIGURE)
    accumulator.Reload()
    return accumulator


def steps(events, tag):
    return [event.step for event in events.Scalars(tag)]


def captions_after_steps(captions_per_epoch, batch_size, epochs, log_every):
    """Captions trained on after every `log_every`-th step of a one-process run (an epoch's last
    step may be short)."""
    totals, total = [], 0
    for _ in range(epochs):
        for start in range(0, captions_per_epoch, batch_size):
            total += min(batch_size, captions_per_epoch - start)
            totals.append(total)
    return totals[log_every - 1::log_every]


def metrics_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_run_logs_its_curves_at_captions_trained(trained_run, packed_data):
    events = read_events(trained_run)
    per_epoch = len(CaptionDataset(packed_data, "train"))  # captions; the run: 2 epochs, batch 16
    step_tags = {f"train/{name}" for name in ("loss", "top5", "attention_penalty", "grad_norm", "grad_max_abs",
                                              "clipped_fraction", "lr_decoder", "lr_encoder", "seconds",
                                              "data_seconds", "captions_per_s")}
    assert step_tags <= set(events.Tags()["scalars"])
    for tag in step_tags:  # --log-every 50 by default
        assert steps(events, tag) == captions_after_steps(per_epoch, 16, 2, 50)
    # Every number of metrics.csv, at the captions trained on when the epoch ended.
    rows = metrics_rows(trained_run)
    for name in ("train_loss", "train_top5", "val_tf_loss", "val_tf_top5", "val_decoded_bleu4", "decoder_lr"):
        logged = events.Scalars(f"epoch/{name}")
        assert [e.step for e in logged] == [per_epoch, 2 * per_epoch]
        assert [e.value for e in logged] == pytest.approx([float(r[name]) for r in rows], rel=1e-6)
    assert 0 < events.Scalars("train/loss")[0].value < 10
    assert events.Scalars("train/lr_decoder")[0].value == pytest.approx(3e-3)

    assert events.Tags()["images"] == []  # the tests' --log-images 0
    # And the picture without TensorBoard.
    with Image.open(trained_run / "curves.png") as picture:
        assert picture.format == "PNG" and picture.width > 600


def test_each_validation_logs_the_caption_and_attention_figure_of_the_same_images(packed_data, tmp_path):
    out = tmp_path / "run"
    train.main(["--data-folder", str(packed_data), "--output-dir", str(out), "--epochs", "2", *TINY_MODEL,
                "--log-images", "2"])
    events = read_events(out)
    per_epoch = len(CaptionDataset(packed_data, "train"))
    assert sorted(events.Tags()["images"]) == ["attention/val_image_0", "attention/val_image_1"]
    for i in range(2):
        figures = events.Images(f"attention/val_image_{i}")
        assert [f.step for f in figures] == [per_epoch, 2 * per_epoch]
        with Image.open(io.BytesIO(figures[-1].encoded_image_string)) as picture:
            assert picture.size == (figures[-1].width, figures[-1].height) and picture.width > 300
        assert [t.step for t in events.Tensors(f"caption/val_image_{i}/text_summary")] == [per_epoch, 2 * per_epoch]
    # The last caption logged is what last.pt decodes for the second validation image, as validation does.
    encoder, decoder, state = models_from_checkpoint(out / "last.pt", torch.device("cpu"))
    val_set, word_map = CaptionDataset(packed_data, "val"), state["word_map"]
    with torch.no_grad():
        tokens = decoder.beam_search(encoder(val_set[1][0].unsqueeze(0)), word_map["<start>"], word_map["<end>"],
                                     beam_size=1, max_steps=val_set.manifest["max_len"] + 1)
    words = decode_tokens(tokens[0], {v: k for k, v in word_map.items()})
    text = events.Tensors("caption/val_image_1/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text == " ".join(words)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train, training_log
add_step = training_log.TrainingLog.add_step

def add_step_then_flush(self, steps_trained, captions_trained, values):
    # What was logged is on disk when the kill comes: the resumed run must drop it, not repeat it.
    add_step(self, steps_trained, captions_trained, values)
    self.flush()
    if steps_trained == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)

training_log.TrainingLog.add_step = add_step_then_flush
train.main(sys.argv[1:])
"""


def test_resume_after_sigkill_gives_one_point_per_step(packed_data, tmp_path):
    out = tmp_path / "run"
    argv = ["--data-folder", str(packed_data), "--output-dir", str(out), "--epochs", "2", *TINY_MODEL,
            "--log-every", "1", "--log-images", "1", "--save-every", "4"]
    per_epoch = len(CaptionDataset(packed_data, "train"))
    steps_per_epoch = math.ceil(per_epoch / 16)
    # Killed in epoch 1 two steps after its last checkpoint (the 4th step of the epoch), with epoch
    # 0's validation logged before.
    kill_after = steps_per_epoch + 6
    process = subprocess.run([sys.executable, "-c", KILLED_RUN.format(repo=str(REPO), kill_after=kill_after), *argv],
                             cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert torch.load(out / "last.pt", weights_only=True)["steps_trained"] == steps_per_epoch + 4

    train.main(argv + ["--resume", str(out / "last.pt")])
    events = read_events(out)
    expected = captions_after_steps(per_epoch, 16, 2, 1)
    for tag in ("train/loss", "train/grad_norm", "train/captions_per_s"):
        assert steps(events, tag) == expected  # every step once, in order
    assert steps(events, "epoch/val_decoded_bleu4") == [per_epoch, 2 * per_epoch]
    assert [f.step for f in events.Images("attention/val_image_0")] == [per_epoch, 2 * per_epoch]

    # On disk the killed run's two steps past the checkpoint are there twice; the resumed run trained
    # them again exactly (same loss), and TensorBoard shows them once.
    raw = {}
    for path in sorted((out / "tensorboard").iterdir()):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    raw.setdefault(event.step, []).append(value.simple_value)
    repeated = {step: losses for step, losses in raw.items() if len(losses) > 1}
    assert sorted(repeated) == expected[steps_per_epoch + 4:steps_per_epoch + 6]
    assert all(losses[0] == losses[1] for losses in repeated.values())


def filesystem_full(monkeypatch):
    """The disk fills up after the event file was created: every later write fails with ENOSPC."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)


@pytest.mark.parametrize("failure", ["log folder is not a directory", "disk full"])
def test_a_disk_that_refuses_the_logs_warns_once_and_training_goes_on(packed_data, tmp_path, capsys, monkeypatch,
                                                                      failure):
    out = tmp_path / "run"
    out.mkdir()
    if failure == "disk full":
        filesystem_full(monkeypatch)
    else:
        (out / "tensorboard").write_text("a file where the log folder would go")
    history = train.main(["--data-folder", str(packed_data), "--output-dir", str(out), "--epochs", "1", *TINY_MODEL,
                          "--log-every", "1", "--log-images", "1"])
    assert capsys.readouterr().err.count("warning: cannot write the TensorBoard logs") == 1
    assert len(history) == 1 and len(metrics_rows(out)) == 1
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_hard_attention_logs_its_reward_baseline_and_entropy(packed_data, tmp_path):
    out = tmp_path / "run"
    train.main(["--data-folder", str(packed_data), "--output-dir", str(out), "--epochs", "1", *TINY_MODEL,
                "--attention", "hard", "--log-every", "10", "--log-images", "1"])
    events = read_events(out)
    rewards = [e.value for e in events.Scalars("train/hard_reward")]
    baselines = [e.value for e in events.Scalars("train/hard_baseline")]
    entropies = [e.value for e in events.Scalars("train/attention_entropy")]
    assert len(rewards) == len(baselines) == len(entropies) == 3  # 30 steps
    assert all(r < 0 for r in rewards + baselines)  # log-likelihoods of whole captions
    assert all(0 < h <= math.log(64) + 1e-4 for h in entropies)  # an 8x8 grid
    assert float(metrics_rows(out)[0]["hard_baseline"]) == pytest.approx(
        torch.load(out / "last.pt", weights_only=True)["hard_baseline"])


def test_scst_logs_reward_baseline_and_cider_at_sampled_captions(trained_run, packed_data, tmp_path):
    out = tmp_path / "scst"
    scst.main([str(a) for a in ["--checkpoint", trained_run / "best.pt", "--data-folder", packed_data,
                                "--output-dir", out, "--workers", 0, "--batch-size", 8, "--steps-per-epoch", 2,
                                "--epochs", 2, "--scst-samples", 3, "--log-every", 1, "--log-images", 1]])
    events = read_events(out)
    per_step = 8 * 3  # images x samples
    for tag in ("train/reward", "train/baseline", "train/grad_norm", "train/lr_decoder"):
        assert steps(events, tag) == [per_step, 2 * per_step, 3 * per_step, 4 * per_step]
    rows = metrics_rows(out)
    logged = events.Scalars("epoch/val_decoded_cider")
    assert [e.step for e in logged] == [2 * per_step, 4 * per_step]
    assert [e.value for e in logged] == pytest.approx([float(r["val_decoded_cider"]) for r in rows], rel=1e-6)
    assert (out / "curves.png").is_file()


def test_no_tensorboard_writes_no_logs(trained_run, packed_data, tmp_path):
    out = tmp_path / "scst"
    scst.main([str(a) for a in ["--checkpoint", trained_run / "best.pt", "--data-folder", packed_data,
                                "--output-dir", out, "--workers", 0, "--batch-size", 8, "--steps-per-epoch", 1,
                                "--epochs", 1, "--no-tensorboard"]])
    assert not (out / "tensorboard").exists() and (out / "metrics.csv").is_file()


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_curves_mark_the_first_best_epoch_by_the_score_that_picks_best_pt(tmp_path, capsys):
    bleu = [0.1, 0.3, 0.3, 0.2]
    write_csv(tmp_path / "metrics.csv", [
        {"epoch": e, "train_loss": 3 - e, "train_top5": 0.5, "val_tf_loss": 3.1 - e, "val_tf_top5": 0.5,
         "val_decoded_bleu4": b, "decoder_lr": 1e-3, "encoder_lr": 0.0, "seconds": 1.0} for e, b in enumerate(bleu)])
    metrics = plot_metrics.read_metrics(tmp_path / "metrics.csv")
    assert plot_metrics.best_epoch(metrics) == 1  # best.pt is replaced only by a strictly better epoch
    assert plot_metrics.main([str(tmp_path)]) == tmp_path / "curves.png"
    assert capsys.readouterr().out.strip() == f"curves: {tmp_path / 'curves.png'}"
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.format == "PNG"

    # scst.py keeps best.pt by CIDEr-D, not BLEU-4.
    write_csv(tmp_path / "metrics.csv", [
        {"epoch": e, "train_reward": 0.5, "train_baseline": 0.4, "val_decoded_bleu4": b, "val_decoded_cider": c}
        for e, (b, c) in enumerate([(0.3, 0.9), (0.2, 1.1), (0.4, 1.0)])])
    assert plot_metrics.best_epoch(plot_metrics.read_metrics(tmp_path / "metrics.csv")) == 1


def test_curves_name_the_closest_reference_reward_of_an_scst_run(tmp_path):
    write_csv(tmp_path / "metrics.csv", [
        {"epoch": e, "train_reward": 7.0 + e, "train_baseline": 6.9 + e, "val_decoded_bleu4": 0.8,
         "val_decoded_cider": 7.5 + e} for e in range(2)])
    assert plot_metrics.run_labels(tmp_path) == plot_metrics.LABELS  # no args.json: the plain names
    (tmp_path / "args.json").write_text(json.dumps({"reward_against": "all"}))
    assert plot_metrics.run_labels(tmp_path)["val_decoded_cider"] == "CIDEr-D"
    (tmp_path / "args.json").write_text(json.dumps({"reward_against": "closest"}))
    labels = plot_metrics.run_labels(tmp_path)
    assert labels["val_decoded_cider"] == "CIDEr-D (closest reference)"
    assert labels["train_reward"] == "reward (closest reference)"
    assert plot_metrics.main([str(tmp_path)]) == tmp_path / "curves.png"


def test_plot_metrics_names_the_missing_file(tmp_path):
    with pytest.raises(UserError, match="metrics.csv: not found"):
        plot_metrics.main([str(tmp_path)])


def test_bench_reports_the_logging_ratio_against_its_target():
    import bench

    assert bench.parse_args(["--sections", "logging"]).sections == ["logging"]
    logging = {"batch_size": 32, "steps_each": 10, "median_seconds_off": 2.0, "median_seconds_on": 2.1,
               "ratio": 1.05, "median_pair_ratio": 1.04, "logging_work_seconds": 0.004, "event_bytes_per_step": 600.0}
    assert bench.targets({"logging": logging})["step time with / without logging at every step"] == {
        "measured": 1.05, "wanted": "< 1.02", "met": False}
    assert "| ratio with / without (median of the pairs of neighbouring steps) | **1.050** (1.040) |" in \
        bench.logging_table(logging)
