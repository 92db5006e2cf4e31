"""One torchrun process for tests/test_distributed.py: run train.main, then save what the test checks.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py --dump DIR -- --data-folder D ...

Everything after `--` goes to train.main unchanged. Into DIR/rank{RANK}.pt each process saves its
final encoder and decoder state dicts, the history train.main returned (or its exit code), the
metrics and captions of its last validate() call, the order of its training items in each epoch,
and every file it opened for writing (a Python audit hook), so the test can compare processes without
train.py knowing it is being tested.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from datasets import CaptionDataset  # noqa: E402
from checkpoints import models_from_checkpoint  # noqa: E402

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def record_writes(writes):
    """Append (event, path) to `writes` for every file this process creates, changes or moves."""
    def hook(event, args):
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
                writes.append((event, os.fsdecode(args[0])))  # tensorboard opens bytes paths
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.truncate", "shutil.copyfile",
                       "tempfile.mkstemp", "tempfile.mkdtemp"):
            writes.append((event, os.fsdecode(args[0])))
    sys.addaudithook(hook)


def validate_on_every_rank(checkpoint, rank, beam_size):
    """train.validate of a checkpoint, each rank on its shard of the val split."""
    torch_dist.barrier()  # rank 0 has written the checkpoint
    world_size = torch_dist.get_world_size()
    device = torch.device("cpu")
    encoder, decoder, state = models_from_checkpoint(checkpoint, device)
    args = state["args"]
    val_set = CaptionDataset(args["data_folder"], "val")
    loader = DataLoader(val_set, batch_size=args["batch_size"], sampler=range(rank, len(val_set), world_size))
    return train.validate(encoder, decoder, loader, state["word_map"], device, "none", args["alpha_c"], beam_size,
                          val_set.manifest["max_len"] + 1, world_size)


def spy_on_training(signal_step=None):
    """Make train.py record its models and what training and validation return, into the dict
    returned; with `signal_step`, this process sends itself SIGTERM during that training step."""
    captured = {}

    def spy(function, key, models_of):
        def wrapper(*args, **kwargs):
            captured["models"] = models_of(*args)
            result = function(*args, **kwargs)
            captured[key] = result
            return result
        return wrapper

    train.train_one_epoch = spy(train.train_one_epoch, "train", lambda run, *_: (run.encoder, run.decoder))
    captured["orders"] = []  # the training items this process was given, epoch by epoch

    def recording_loader(dataset, **kwargs):
        if dataset.path.name == "train.h5" and isinstance(kwargs.get("sampler"), list):  # the epoch's shard
            captured["orders"].append(kwargs["sampler"])
        return DataLoader(dataset, **kwargs)
    train.DataLoader = recording_loader
    train.validate = spy(train.validate, "validate", lambda encoder, decoder, *_: (encoder, decoder))
    if signal_step is not None:
        # top5_correct runs once per training step, after that step's stop flags were all-reduced:
        # the other processes learn of this signal one step later, as with a real Ctrl-C.
        calls, top5_correct = [0], train.top5_correct

        def top5_then_signal(*args):
            calls[0] += 1
            if calls[0] == signal_step + 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return top5_correct(*args)
        train.top5_correct = top5_then_signal
    return captured


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", type=Path, required=True, help="folder for rank{RANK}.pt")
    parser.add_argument("--signal-rank", type=int, default=None,
                        help="this rank sends itself SIGTERM during training step --signal-step")
    parser.add_argument("--signal-step", type=int, default=2)
    parser.add_argument("--validate-checkpoint", type=Path, default=None,
                        help="after training, validate this checkpoint on all processes")
    parser.add_argument("--beam-size", type=int, default=3, help="for --validate-checkpoint")
    ours, train_argv = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
    options = parser.parse_args(ours)
    rank = int(os.environ["RANK"])

    writes = []
    record_writes(writes)

    captured = spy_on_training(signal_step=options.signal_step if options.signal_rank == rank else None)

    # Keep train.main's process group for --validate-checkpoint (initialising a second one in the
    # same torchrun worker hangs); it is destroyed at the end.
    destroy_process_group, torch_dist.destroy_process_group = torch_dist.destroy_process_group, lambda: None
    history, exit_code = None, 0
    try:
        history = train.main(train_argv)
    except SystemExit as exc:
        exit_code = exc.code
    writes_during_training = list(writes)

    result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "history": history,
              "exit_code": exit_code, "writes": writes_during_training}
    encoder, decoder = (train.unwrap(m) for m in captured["models"])
    result["state"] = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                       **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    result["orders"] = captured["orders"]
    if "validate" in captured:
        result["validate"] = captured["validate"]

    if options.validate_checkpoint is not None:
        result["validate_checkpoint"] = validate_on_every_rank(options.validate_checkpoint, rank, options.beam_size)
    destroy_process_group()

    options.dump.mkdir(parents=True, exist_ok=True)
    torch.save(result, options.dump / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
