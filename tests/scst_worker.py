"""scst.py with its sampling made deterministic, to compare one update of two torchrun processes with
one process on the union of their batches (tests/test_scst.py).

    torchrun --standalone --nproc_per_node=2 tests/scst_worker.py --dump DIR -- <scst.py arguments>

Each image's first sample is the start of its first reference caption and the others are <unk> words,
all --max-sample-length long, with the log-probabilities of the teacher-forced pass without dropout:
the same on any process, whatever its random state. Into DIR/rank{RANK}.pt each process saves what
`record_first_update` records: its first step's images, samples and mean reward, and the gradient of
its first update as the optimiser received it.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scst  # noqa: E402
from cider import split_references  # noqa: E402
from datasets import read_word_map  # noqa: E402


def deterministic_sampler(record, step_images, first_references, unk_token):
    """A stand-in for scst.sample_captions (same arguments and outputs) that draws nothing at random:
    for the images of the step (step_images["indices"]), their first reference caption's tokens
    (first_references[i]) and rows of `unk_token`. The first call's samples go into record["tokens"]."""
    def sample_captions(decoder, encoder_out, start_token, end_token, num_samples, max_length):
        rows = []
        for i in step_images["indices"]:  # an image's samples are consecutive, as in scst.sample_captions
            rows.append((first_references[i] + [end_token] * max_length)[:max_length])
            rows += [[unk_token] * (max_length - 1) + [end_token]] * (num_samples - 1)
        tokens = torch.tensor(rows, device=encoder_out.device)  # (B*S, T)
        captions = F.pad(tokens, (1, 0), value=start_token)  # (B*S, T+1)
        lengths = torch.full((len(rows),), max_length + 1, device=encoder_out.device)
        training = decoder.training
        decoder.eval()  # no dropout: the same log-probabilities on every process
        scores, _, _ = decoder(encoder_out.repeat_interleave(num_samples, dim=0), captions, lengths)  # (B*S, T, V)
        decoder.train(training)
        log_probs = F.log_softmax(scores, dim=2).gather(2, tokens.unsqueeze(2)).squeeze(2)  # (B*S, T)
        record.setdefault("tokens", tokens.tolist())
        return tokens, log_probs, torch.ones_like(tokens, dtype=torch.bool)
    return sample_captions


def record_first_update(set_attribute, record, data_folder):
    """Make scst.py deterministic and record its first step into `record`: "indices" (its images in the
    train split), "tokens" (the samples), "reward" (the mean reward scst_step returned) and "grads"
    (each parameter's gradient as the optimiser received it). `set_attribute(obj, name, value)` is
    setattr, or a test's monkeypatch.setattr. Returns the optimiser hook's handle (remove it after)."""
    word_map = read_word_map(data_folder)
    first_references = [[word_map.get(w, word_map["<unk>"]) for w in refs[0]]
                        for refs in split_references(data_folder, "train")]
    step, step_images = scst.scst_step, {}

    def recording_step(run, images, indices, *rest):
        step_images["indices"] = indices.tolist()
        result = step(run, images, indices, *rest)
        if "indices" not in record:
            record["indices"], record["reward"] = indices.tolist(), result[0]
        return result

    def before_optimizer_step(optimizer, args, kwargs):
        if "grads" not in record:
            record["grads"] = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]
                               if p.grad is not None]

    sampler = deterministic_sampler(record, step_images, first_references, word_map["<unk>"])
    set_attribute(scst, "sample_captions", sampler)
    set_attribute(scst, "scst_step", recording_step)
    return register_optimizer_step_pre_hook(before_optimizer_step)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", type=Path, required=True, help="folder for rank{RANK}.pt")
    ours, scst_argv = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
    options = parser.parse_args(ours)
    record = {}
    record_first_update(setattr, record, Path(scst_argv[scst_argv.index("--data-folder") + 1]))
    scst.main(scst_argv)
    options.dump.mkdir(parents=True, exist_ok=True)
    torch.save(record, options.dump / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
