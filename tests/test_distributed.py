"""train.py under torchrun on the CPU (gloo backend), two processes, on a tiny shapes set.

Each torchrun process runs tests/ddp_worker.py, which calls train.main unchanged and then saves its
final weights, history, validation results and every file it wrote, one file per rank; the tests
compare the ranks with each other and with a single process on the same checkpoint.
"""
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, DistributedSampler

import eval as evaluate_script
import train
from datasets import CaptionDataset
from checkpoints import models_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_worker.py"
MODEL = ["--encoder-arch", "resnet18", "--encoder-cut-after", "layer2", "--encoded-size", "8", "--no-pretrained",
         "--attention-dim", "32", "--embed-dim", "16", "--decoder-dim", "32", "--workers", "0"]
# Batch 4 per process and a high learning rate: after 2 epochs the decoded captions already differ
# between images, so a validation that paired captions with the wrong images would show.
FINE_TUNED = MODEL + ["--fine-tune-encoder", "--batch-size", "4", "--decoder-lr", "1e-2", "--encoder-lr", "1e-3"]
# A frozen, randomly initialised encoder is not wrapped in DDP: only equal seeds make it equal on all ranks.
FROZEN = MODEL + ["--batch-size", "16"]
RUN_FILES = ["args.json", "best.pt", "curves.png", "last.pt", "metrics.csv", "tensorboard"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """64 shapes images packed at 64x64: 40 train (200 captions), 16 val, 8 test."""
    import create_input_files
    import make_shapes_dataset

    raw, packed = tmp_path_factory.mktemp("ddp_raw"), tmp_path_factory.mktemp("ddp_packed")
    make_shapes_dataset.main(["--output-folder", str(raw), "--num-images", "64", "--seed", "5",
                              "--val-fraction", "0.25", "--test-fraction", "0.125"])
    create_input_files.main(["--dataset", "shapes", "--karpathy-json", str(raw / "dataset_shapes.json"),
                             "--image-folder", str(raw), "--output-folder", str(packed), "--image-size", "64",
                             "--workers", "0", "--min-word-freq", "1"])
    return packed


def launch(launcher_args, worker_args, train_args, log):
    """Start `torchrun LAUNCHER_ARGS tests/ddp_worker.py WORKER_ARGS -- TRAIN_ARGS` in its own session."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(WORKER), *worker_args,
               "--", *train_args]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    process.log = log
    return process


def wait_all(processes, timeout=180):
    """Wait for every launcher to succeed. When one fails or they hang, kill all of them and their
    workers at once (a launcher whose peer failed can wait minutes at torchrun's exit barrier)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in processes):
            break
        time.sleep(0.2)
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for process in processes:
        assert process.returncode == 0, f"torchrun failed or hung; its log ends:\n{process.log.read_text()[-3000:]}"


def read_dumps(folder):
    """The two ranks' results, in rank order."""
    dumps = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [d["rank"] for d in dumps] == [0, 1] and all(d["world_size"] == 2 for d in dumps)
    return dumps


def assert_same_state(a, b):
    """Two {name: tensor} dicts hold the same names and bit-identical tensors."""
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"differ between processes: {differing[:5]}"


def checkpoint_state(path):
    """A checkpoint's weights, named as ddp_worker.py names them."""
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for part in ("encoder", "decoder") for k in state[part])
    return {f"{part}.{k}": v for part in ("encoder", "decoder") for k, v in state[part].items()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validate_single_process(checkpoint, data, beam_size):
    """train.validate on one process over the whole val split, batched differently from the ranks."""
    encoder, decoder, state = models_from_checkpoint(checkpoint, torch.device("cpu"))
    val_set = CaptionDataset(data, "val")
    return train.validate(encoder, decoder, DataLoader(val_set, batch_size=16), state["word_map"],
                          torch.device("cpu"), "none", state["args"]["alpha_c"], beam_size,
                          val_set.manifest["max_len"] + 1, world_size=1)


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """`torchrun --standalone --nproc_per_node=2` training 2 epochs, then validating best.pt on 2 ranks."""
    out, dump = tmp_path_factory.mktemp("ddp_run"), tmp_path_factory.mktemp("ddp_dump")
    wait_all([launch(["--standalone", "--nproc_per_node=2"],
                     ["--dump", str(dump), "--validate-checkpoint", str(out / "best.pt"), "--beam-size", "3"],
                     ["--data-folder", str(tiny_data), "--output-dir", str(out), "--epochs", "2", *FINE_TUNED],
                     dump / "torchrun.log")])
    return out, read_dumps(dump)


def test_two_processes_train_one_model_and_rank0_writes_one_run(ddp_run, tiny_data):
    out, dumps = ddp_run
    assert [d["exit_code"] for d in dumps] == [0, 0]
    # DDP kept the weights (and the BatchNorm statistics) bit-identical, and every per-epoch metric and
    # decision (best epoch, learning-rate decay, early stopping) was the same on both processes.
    assert_same_state(dumps[0]["state"], dumps[1]["state"])
    assert len(dumps[0]["history"]) == 2
    assert without_seconds(dumps[0]["history"]) == without_seconds(dumps[1]["history"])

    # Every epoch, the two processes share one new order of the training items: each gets its half.
    orders = [d["orders"] for d in dumps]
    items = len(CaptionDataset(tiny_data, "train"))
    assert [len(o) for o in orders] == [2, 2]
    for epoch in (0, 1):
        assert sorted(orders[0][epoch] + orders[1][epoch]) == list(range(items))
    assert orders[0][0] != orders[0][1] and orders[1][0] != orders[1][1]

    # One run's files, written by rank 0 only, holding the unwrapped modules rank 0 trained.
    assert sorted(os.listdir(out)) == RUN_FILES
    assert dumps[1]["writes"] == []
    # matplotlib (attention figures, curves.png) makes sure its own config and cache folders exist.
    import matplotlib
    its_own = {("os.mkdir", matplotlib.get_configdir()), ("os.mkdir", matplotlib.get_cachedir())}
    outside = [(event, path) for event, path in dumps[0]["writes"]
               if out != Path(path) and out not in Path(path).parents and (event, path) not in its_own]
    assert dumps[0]["writes"] and not outside
    assert_same_state(checkpoint_state(out / "last.pt"), dumps[0]["state"])
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["samples_done"] == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert json.loads((out / "args.json").read_text())["world_size"] == 2

    # One event file, rank 0's, whose x axis counts both processes' captions: 200 an epoch, 8 a step.
    assert len(os.listdir(out / "tensorboard")) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/val_decoded_bleu4")] == [200, 400]
    assert [e.value for e in events.Scalars("epoch/val_decoded_bleu4")] == pytest.approx(
        [float(r["val_decoded_bleu4"]) for r in rows], rel=1e-6)
    assert [e.step for e in events.Images("attention/val_image_0")] == [200, 400]
    assert [e.step for e in events.Scalars("train/loss")] == [400]  # step 50 (--log-every 50) of 4 + 4 captions


def test_distributed_validation_equals_single_process(ddp_run, tiny_data):
    out, dumps = ddp_run
    # During training: train.py's own sharded validation of the final weights (= last.pt), 4 images a
    # batch on each rank, against one process decoding all 16 images in one batch.
    metrics, decoded = validate_single_process(out / "last.pt", tiny_data, beam_size=1)
    assert len(decoded) == 16 and len({tuple(h) for _, h in decoded}) > 1
    for dump in dumps:
        ddp_metrics, ddp_decoded = dump["validate"]
        assert ddp_decoded == decoded  # every image once, in order, with the same caption
        assert ddp_metrics["val_decoded_bleu4"] == metrics["val_decoded_bleu4"]
        assert ddp_metrics["val_tf_top5"] == metrics["val_tf_top5"]
        assert ddp_metrics["val_tf_loss"] == pytest.approx(metrics["val_tf_loss"], rel=1e-6)
    assert float(list(csv.DictReader(open(out / "metrics.csv")))[-1]["val_decoded_bleu4"]) == \
        metrics["val_decoded_bleu4"]

    # After training: both ranks validating best.pt with beam search.
    metrics, decoded = validate_single_process(out / "best.pt", tiny_data, beam_size=3)
    for dump in dumps:
        ddp_metrics, ddp_decoded = dump["validate_checkpoint"]
        assert ddp_decoded == decoded
        assert ddp_metrics["val_decoded_bleu4"] == metrics["val_decoded_bleu4"]
        assert ddp_metrics["val_tf_loss"] == pytest.approx(metrics["val_tf_loss"], rel=1e-6)


def test_checkpoint_resumes_on_one_process_and_eval_loads_it(ddp_run, tiny_data, tmp_path):
    out, _ = ddp_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    history = train.main(["--data-folder", str(tiny_data), "--output-dir", str(run), "--epochs", "3",
                          "--resume", str(run / "last.pt"), *FINE_TUNED])
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3
    assert json.loads((run / "args.json").read_text())["world_size"] == 1

    metrics = evaluate_script.main(["--checkpoint", str(out / "best.pt"), "--data-folder", str(tiny_data),
                                    "--split", "val", "--beam-size", "1", "--output-dir", str(tmp_path / "eval"),
                                    "--no-coco-metrics", "--device", "cpu", "--workers", "0"])
    best_epoch = torch.load(out / "best.pt", weights_only=True)["epoch"] - 1
    assert metrics["bleu4"] == pytest.approx(history[best_epoch]["val_decoded_bleu4"], rel=1e-9)


@pytest.mark.parametrize("per_image,batch", [(1, 16), (5, 10)])
def test_signal_on_one_of_two_nodes_stops_both_and_resumes_on_one_process(tiny_data, tmp_path, monkeypatch,
                                                                          per_image, batch):
    # The multi-node form on localhost: two launchers, one process each, meeting at a c10d rendezvous.
    # With 5 captions per image per step, each step holds 2 images and their 5 captions each.
    out, dump, port = tmp_path / "run", tmp_path / "dump", free_port()
    train_args = ["--data-folder", str(tiny_data), "--output-dir", str(out), "--epochs", "2", *FROZEN,
                  "--batch-size", str(batch), "--captions-per-image-per-step", str(per_image)]
    wait_all([launch(["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=ddp-test"],
                     ["--dump", str(dump), "--signal-rank", "1", "--signal-step", "2"], train_args,
                     tmp_path / f"torchrun_node{node}.log")
              for node in range(2)])
    dumps = read_dumps(dump)

    # Rank 1 got SIGTERM during step 2; both processes stopped after step 3, with the same weights,
    # and rank 0 saved them mid-epoch: 4 steps x `batch` captions x 2 processes.
    assert [d["exit_code"] for d in dumps] == [128 + signal.SIGTERM] * 2
    assert_same_state(dumps[0]["state"], dumps[1]["state"])
    assert sorted(os.listdir(out)) == ["args.json", "last.pt", "tensorboard"] and dumps[1]["writes"] == []
    assert_same_state(checkpoint_state(out / "last.pt"), dumps[0]["state"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["samples_done"] == 4 * batch * 2

    # Resume on one process: it trains exactly on the captions the two processes had not reached.
    # Sampler indices are items: captions, or with 5 per image, images, which the shards split.
    samplers = []

    def recording_loader(dataset, **kwargs):
        if isinstance(kwargs.get("sampler"), list):
            samplers.append(kwargs["sampler"])
        return DataLoader(dataset, **kwargs)

    monkeypatch.setattr(train, "DataLoader", recording_loader)
    history = train.main([*train_args, "--epochs", "1", "--resume", str(out / "last.pt")])
    assert len(history) == 1 and torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    train_set = CaptionDataset(tiny_data, "train", captions_per_item=per_image)
    done = []
    for rank in (0, 1):
        sampler = DistributedSampler(train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        done += list(sampler)[:4 * batch // per_image]
    assert sorted(done + samplers[0]) == list(range(len(train_set)))


def test_a_time_limit_sigterm_saves_last_pt_and_torchrun_exits_1(tiny_data, tmp_path):
    # What the README's Troubleshooting tells a cluster script: the workers save last.pt and say so, but torchrun
    # answers SIGTERM with its own exit code 1 (and a SignalException traceback), not 143. The signal
    # goes to the whole process group, as a scheduler's time limit does.
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--data-folder", str(tiny_data), "--output-dir", str(out), "--epochs", "50", *FROZEN,
               "--batch-size", "2"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "args.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # some steps into the run
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    stderr = stderr.decode()
    assert process.returncode == 1, stderr[-2000:]
    assert f"stopped by signal {int(signal.SIGTERM)}; saved {out / 'last.pt'}" in stderr
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["samples_done"] > 0 or state["epoch"] > 0


def test_hard_attention_with_the_deep_output_layer_trains_alike_on_two_processes(tiny_data, tmp_path):
    # The cells are sampled on each process from its own captions, but the baseline is updated from
    # all processes' log-likelihoods: the weights, the baseline and every metric stay equal on both.
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    wait_all([launch(["--standalone", "--nproc_per_node=2"], ["--dump", str(dump)],
                     ["--data-folder", str(tiny_data), "--output-dir", str(out), "--epochs", "1", *FINE_TUNED,
                      "--attention", "hard", "--output-layer", "deep",
                      "--captions-per-image-per-step", "5", "--batch-size", "10"],
                     dump / "torchrun.log")])
    dumps = read_dumps(dump)
    assert_same_state(dumps[0]["state"], dumps[1]["state"])
    assert without_seconds(dumps[0]["history"]) == without_seconds(dumps[1]["history"])
    baseline = float(dumps[0]["history"][0]["hard_baseline"])
    assert baseline < 0 and baseline == torch.load(out / "last.pt", weights_only=True)["hard_baseline"]
