"""Train the encoder, attention and decoder with teacher forcing; pick the best epoch by decoded BLEU-4.

    python train.py --data-folder data/coco_packed --output-dir runs/coco
    python train.py --data-folder data/coco_packed --output-dir runs/coco --resume runs/coco/last.pt
    torchrun --nproc_per_node=4 train.py --data-folder data/coco_packed --output-dir runs/coco

Writes into --output-dir: last.pt (every epoch, and every --save-every steps), best.pt (the epoch with
the best validation BLEU-4 from real decoding), metrics.csv (one row per epoch), args.json,
tensorboard/ (curves and attention images: `tensorboard --logdir DIR/tensorboard`, see training_log.py)
and, at the end, curves.png (plot_metrics.py).
Under torchrun each process reads its own shard of the data; --batch-size is per process.
"""

import argparse
import csv
import io
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from beam_search import LENGTH_PENALTY_HELP
from checkpoints import (ARCH_ARGS, CHECKPOINT_VERSION, arch_arg, build_models, load_checkpoint,
                         load_model_weights, rng_state, save_checkpoint, set_rng_state)
from datasets import CaptionDataset, read_word_map, reference_tokens
from losses import (attention_penalty, caption_loss, caption_loss_sums, hard_attention_terms, loss_from_sums,
                    top5_correct, updated_baseline)
from metrics import bleu_scores
from models import ATTENTION_TYPES, OUTPUT_LAYERS, RESNET_ARCHS, RESNET_BLOCKS
from plot_metrics import write_curves
from training_log import TrainingLog, add_logging_flags, attention_entropy, gradient_figures
from utils import UserError, atomic_write, keep_freed_memory, resolve_device, run_main


def parse_args(argv=None):
    """Command-line flags, grouped as data / model / optimisation / system."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_and_model_flags(parser)
    add_optimisation_flags(parser.add_argument_group("optimisation"))
    add_system_flags(parser.add_argument_group("system"))
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "encoded_size", "val_beam_size", "captions_per_image_per_step",
                 "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size % args.captions_per_image_per_step:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of --captions-per-image-per-step "
                     f"{args.captions_per_image_per_step}: a step holds whole groups of an image's captions")
    if not 0.0 <= args.hard_expectation_prob <= 1.0 or not 0.0 <= args.hard_baseline_decay < 1.0:
        parser.error("--hard-expectation-prob must lie in [0, 1] and --hard-baseline-decay in [0, 1)")
    if args.val_length_penalty < 0:
        parser.error("--val-length-penalty must be at least 0")
    if args.alpha_c is None:  # section 4.2.1's penalty belongs to soft attention's training (eq. 14)
        args.alpha_c = 0.0 if args.attention == "hard" else 1.0
    return args


def add_data_and_model_flags(parser):
    """The data group, and the model group whose values a checkpoint fixes."""
    data = parser.add_argument_group("data")
    data.add_argument("--data-folder", type=Path, required=True,
                      help="output folder of create_input_files.py")
    data.add_argument("--output-dir", type=Path, default=Path("runs/train"),
                      help="where checkpoints, metrics.csv and args.json go (default runs/train)")
    data.add_argument("--workers", type=int, default=4,
                      help="DataLoader worker processes per training process (default 4)")

    model = parser.add_argument_group("model (fixed for a run: --resume refuses other values)")
    model.add_argument("--encoder-arch", choices=RESNET_ARCHS, default="resnet101",
                       help="torchvision ResNet used as the encoder (default resnet101)")
    model.add_argument("--encoder-cut-after", choices=RESNET_BLOCKS, default="layer4",
                       help="last ResNet block kept; earlier blocks give a finer, cheaper grid "
                            "(default layer4, the paper's setup)")
    model.add_argument("--encoded-size", type=int, default=14,
                       help="side of the encoder grid the attention looks at (default 14)")
    model.add_argument("--attention-dim", type=int, default=512, help="attention size A (default 512)")
    model.add_argument("--embed-dim", type=int, default=512, help="word embedding size M (default 512)")
    model.add_argument("--decoder-dim", type=int, default=512, help="LSTM size D (default 512)")
    model.add_argument("--dropout", type=float, default=0.5,
                       help="dropout before the output layer (0.5); the deep output layer applies it twice, "
                            "to h_t and to its hidden layer, as the paper's code does")
    model.add_argument("--attention", choices=ATTENTION_TYPES, default="soft",
                       help="soft: the context is the attention-weighted mean of the features (section 4.2, "
                            "default); hard: the feature vector of one cell, sampled in training and trained "
                            "with REINFORCE (section 4.1)")
    model.add_argument("--output-layer", choices=OUTPUT_LAYERS, default="linear",
                       help="linear: word scores from the LSTM state alone, the tutorial's (default); deep: "
                            "from the previous word, the LSTM state and the context, the paper's eq. 7")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start the encoder from torchvision's ImageNet weights, downloaded once "
                            "(default); --no-pretrained starts from random weights")
    model.add_argument("--encoder-weights", type=Path, default=None,
                       help="start the encoder from this torchvision state dict file instead")


def add_optimisation_flags(opt):
    """Epochs, batch, learning rates and their decay, the loss's weights, validation decoding."""
    opt.add_argument("--epochs", type=int, default=120, help="most epochs to train (default 120)")
    opt.add_argument("--batch-size", type=int, default=32,
                     help="captions per step per process: under torchrun the global batch is "
                          "this times the number of processes (default 32)")
    opt.add_argument("--captions-per-image-per-step", type=int, default=1, metavar="K",
                     help="a step holds --batch-size / K images and K captions of each, and runs the "
                          "encoder once per image, not once per caption; an epoch still trains every caption "
                          "once. K must divide --batch-size and the captions packed per image (5 by default), "
                          "else train.py refuses. Default 1: captions drawn one by one, as the paper does")
    opt.add_argument("--decoder-lr", type=float, default=4e-4, help="Adam learning rate, decoder (4e-4)")
    opt.add_argument("--encoder-lr", type=float, default=1e-4,
                     help="Adam learning rate, encoder, when fine-tuned (1e-4)")
    opt.add_argument("--fine-tune-encoder", action="store_true",
                     help="train encoder blocks 2-4 (all of it when randomly initialised)")
    opt.add_argument("--grad-clip", type=float, default=5.0,
                     help="clip each gradient value to [-c, c], as in the tutorial (default 5; 0 = off)")
    opt.add_argument("--alpha-c", type=float, default=None,
                     help="weight of the doubly stochastic attention penalty (default 1 with soft attention; "
                          "0 with hard, whose training in the paper, section 4.1, has no such penalty)")
    opt.add_argument("--lr-decay-patience", type=int, default=8,
                     help="multiply learning rates by --lr-decay-factor after this many epochs "
                          "without a better validation BLEU-4 (default 8)")
    opt.add_argument("--lr-decay-factor", type=float, default=0.8, help="learning-rate decay (default 0.8)")
    opt.add_argument("--early-stop-patience", type=int, default=20,
                     help="stop after this many epochs without a better validation BLEU-4 (default 20)")
    opt.add_argument("--precise-bn-batches", type=int, default=0, metavar="N",
                     help="before each validation, recompute the trained encoder's BatchNorm statistics from N "
                          "training batches at the current weights (PreciseBN, Wu and Johnson 2021), instead of "
                          "the moving averages training kept, which lag weights that move fast (a randomly "
                          "initialised encoder at a high learning rate; docs/demo.md). Checkpoints keep the "
                          "recomputed statistics. Default 0: off, the paper's setup")
    opt.add_argument("--val-beam-size", type=int, default=1,
                     help="beam size of the decoding that gives validation BLEU-4 (default 1, greedy)")
    opt.add_argument("--val-length-penalty", type=float, default=0.0,
                     help="length penalty of that decoding: " + LENGTH_PENALTY_HELP)
    add_hard_attention_flags(opt)


def add_hard_attention_flags(opt):
    """How hard attention trains (section 4.1); soft attention ignores these."""
    opt.add_argument("--hard-expectation-prob", type=float, default=0.5,
                     help="hard attention: chance that a caption reads the expectation (the soft context) "
                          "instead of sampled cells, to lower the gradient's variance (default 0.5, the paper's)")
    opt.add_argument("--hard-baseline-decay", type=float, default=0.9,
                     help="hard attention: b = decay * b + (1 - decay) * log p(y | s, a), the moving-average "
                          "baseline of REINFORCE (default 0.9, the paper's)")
    opt.add_argument("--hard-reinforce-weight", type=float, default=0.1,
                     help="hard attention: weight lambda_r of the REINFORCE term (default 0.1, the authors' "
                          "code; the paper gives no value)")
    opt.add_argument("--hard-entropy", type=float, default=0.01,
                     help="hard attention: weight lambda_e of the attention entropy bonus (default 0.01; the "
                          "paper gives no value)")


def add_system_flags(system):
    """Device, mixed precision, seed, resuming and periodic checkpoints."""
    system.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    system.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision: bf16, or fp16 with a gradient scaler (default none); made for "
                             "CUDA, and run by torch's CPU autocast on the CPU (with a note saying so)")
    system.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    system.add_argument("--resume", type=Path, default=None,
                        help="continue from this checkpoint (last.pt) exactly where it stopped")
    system.add_argument("--save-every", type=int, default=0,
                        help="also write last.pt every N training steps (default 0: each epoch only)")
    add_logging_flags(system)


# ----------------------------------------------------------------------------------------------
# Processes and devices


def setup_distributed(device_flag):
    """Start the process group when torchrun launched us; returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_flag)
    if device_flag not in ("auto", "cpu"):
        resolve_device(device_flag)  # refuses cuda where there is none, in one sentence
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device_flag != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return torch_dist.get_rank(), torch_dist.get_world_size(), device


def all_reduce_sum(values, device, world_size):
    """Sum a list of floats over all processes (identity on one process)."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def worker_init(_):
    """DataLoader workers decode and normalise only: one thread each, so they do not starve training.
    Ctrl-C, and a scheduler's SIGTERM, reach the whole process group: the main process saves a
    checkpoint and shuts the workers down itself, so the workers ignore both."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def autocast(device, amp):
    """The autocast context for --amp."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "none")


# ----------------------------------------------------------------------------------------------
# The run: models, optimisers, progress, and the checkpoints that hold them


@dataclass
class Progress:
    """How far a run has come: what a checkpoint holds besides weights, optimisers and arguments
    (under the same names)."""

    epoch: int = 0  # the epoch being trained, or the next one at an epoch boundary
    samples_done: int = 0  # samples of `epoch` already trained, over all processes
    best_bleu4: float = -1.0
    epochs_since_improvement: int = 0
    history: list = field(default_factory=list)  # one dict of metrics per finished epoch
    # Sums over the steps of `epoch` trained so far, over all processes: what the epoch's train_loss
    # and train_top5 are computed from, so that an epoch resumed part way reports an uninterrupted one's.
    epoch_sums: dict = field(default_factory=lambda: dict.fromkeys(EPOCH_SUMS, 0.0))
    hard_baseline: float = None  # hard attention's REINFORCE baseline b (None before its first batch)
    steps_trained: int = 0  # since the run began
    captions_trained: int = 0  # since the run began, over all processes: the x axis of its curves


EPOCH_SUMS = ("loss", "top5", "words")  # loss x words, correct top-5 predictions, real words


@dataclass
class Run:
    """One training run on this process. Under torchrun the models are DDP-wrapped; checkpoints hold
    the plain modules."""

    args: argparse.Namespace
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    optimizers: dict  # {"decoder": Adam, "encoder": Adam or None (frozen encoder)}
    scaler: torch.amp.GradScaler
    progress: Progress
    word_map: dict
    image_size: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    log: TrainingLog = field(default_factory=TrainingLog.off)  # TensorBoard (rank 0, unless --no-tensorboard)

    @property
    def is_main(self):
        """Rank 0 logs and writes files; the other processes only train."""
        return self.rank == 0

    def active_optimizers(self):
        """The optimisers in use: the encoder's only when it is fine-tuned."""
        return [opt for opt in self.optimizers.values() if opt is not None]

    @cached_property
    def trainable(self):
        """The parameters the optimisers update (fixed for the run): what is checked and clipped."""
        return [p for opt in self.active_optimizers() for group in opt.param_groups for p in group["params"]]

    def checkpoint(self):
        """The whole training state as plain types and state dicts (loadable with weights_only=True)."""
        encoder_optimizer = self.optimizers["encoder"]
        return {
            "format_version": CHECKPOINT_VERSION,
            "encoder": unwrap(self.encoder).state_dict(), "decoder": unwrap(self.decoder).state_dict(),
            "decoder_optimizer": self.optimizers["decoder"].state_dict(),
            "encoder_optimizer": encoder_optimizer.state_dict() if encoder_optimizer else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            **asdict(self.progress), "args": plain(vars(self.args)), "word_map": self.word_map,
            "rng": rng_state(), "image_size": self.image_size,
        }

    def save(self, *names):
        """Write the checkpoint once under each of `names` in --output-dir (rank 0 only)."""
        if self.is_main:
            self.log.flush()  # the curves on disk reach as far as the checkpoint a resume starts from
            state = self.checkpoint()
            for name in names:
                save_checkpoint(self.args.output_dir / name, state)


def plain(arguments):
    """Arguments as JSON- and weights_only-friendly values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in arguments.items()}


def unwrap(module):
    """The plain module under DistributedDataParallel (what checkpoints hold)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def build_optimizers(encoder, decoder, args):
    """Adam for the decoder, and for the encoder's trainable blocks when it is fine-tuned."""
    encoder_params = [p for p in encoder.parameters() if p.requires_grad]
    return {"decoder": torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr),
            "encoder": torch.optim.Adam(encoder_params, lr=args.encoder_lr) if encoder_params else None}


def build_scaler(device, amp):
    """A gradient scaler, enabled for fp16 only (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def decay_learning_rates(optimizers, factor):
    """Multiply every learning rate by `factor`."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] *= factor


def lr_decay_due(progress, args):
    """At an epoch's start: has the run gone a multiple of --lr-decay-patience epochs without improving?"""
    since = progress.epochs_since_improvement
    return progress.samples_done == 0 and since > 0 and since % args.lr_decay_patience == 0


def check_resume_compatible(state, args, path):
    """Refuse to resume with architecture arguments that differ from the checkpoint's."""
    saved = state["args"]
    differing = [f"--{name.replace('_', '-')} {arch_arg(saved, name)} (checkpoint) vs {getattr(args, name)} (now)"
                 for name in ARCH_ARGS if arch_arg(saved, name) != getattr(args, name)]
    if differing:
        raise UserError(f"{path}: cannot resume with other architecture arguments: "
                        + "; ".join(differing) + ". Pass the checkpoint's values or start a new run")


def check_resume_grouping(state, args, path):
    """Refuse to resume mid-epoch with another --captions-per-image-per-step: the rest of the epoch
    would be another order of captions, and some would be trained twice and others never."""
    saved = state["args"].get("captions_per_image_per_step", 1)
    if state["samples_done"] and saved != args.captions_per_image_per_step:
        raise UserError(f"{path}: stopped mid-epoch with --captions-per-image-per-step {saved}, not "
                        f"{args.captions_per_image_per_step}; resume with {saved}")


def read_resume_checkpoint(path, args, word_map):
    """The checkpoint --resume names, checked against this run's arguments and word map. How the
    encoder was initialised belongs to the run, not to this invocation: args takes it from there."""
    state = load_checkpoint(path)
    check_resume_compatible(state, args, path)
    check_resume_grouping(state, args, path)
    if state["word_map"] != word_map:
        raise UserError(f"{path}: its word map differs from {args.data_folder}'s; "
                        "resume on the data folder the run started with")
    args.pretrained, args.encoder_weights = state["args"]["pretrained"], state["args"]["encoder_weights"]
    return state


def resume_training(state, optimizers, scaler, args, world_size):
    """Load a checkpoint's optimisers, scaler and (on one process) random state; returns its Progress.

    Under torchrun each process draws its own dropout masks from its own seed (see `train`), and the
    checkpoint holds rank 0's state only, so only a single-process run continues the exact stream.
    """
    optimizers["decoder"].load_state_dict(state["decoder_optimizer"])
    if optimizers["encoder"] and state.get("encoder_optimizer"):
        optimizers["encoder"].load_state_dict(state["encoder_optimizer"])
    if state.get("scaler") and args.amp == "fp16":
        scaler.load_state_dict(state["scaler"])
    if world_size == 1:
        set_rng_state(state["rng"])
    # Checkpoints from before a field existed resume with its default.
    return Progress(**{f.name: state[f.name] for f in fields(Progress) if f.name in state})


def finished_already(progress, args):
    """Why a resumed run has no epoch left to train (a sentence), or None."""
    if progress.epoch >= args.epochs:
        return (f"has finished {progress.epoch} epochs and --epochs is {args.epochs}; pass a larger "
                "--epochs to train further")
    if progress.epochs_since_improvement >= args.early_stop_patience:
        return (f"stopped early after {progress.epochs_since_improvement} epochs without a better validation "
                f"BLEU-4 (--early-stop-patience {args.early_stop_patience}); pass a larger --early-stop-patience "
                "to train further")
    return None


def write_metrics_csv(path, history):
    """Rewrite metrics.csv from the whole history, atomically (one row per finished epoch)."""
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


# ----------------------------------------------------------------------------------------------
# One step, one epoch of training, and validation


class StopRequested:
    """Set by SIGINT/SIGTERM: the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, _frame):
        self.signal = signum


class TrainingDiverged(UserError):
    """The loss or a gradient stopped being a finite number."""

    @classmethod
    def at(cls, what, epoch, step, args):
        """The error for `what` happening at `step` (counted from the epoch's start) of `epoch`."""
        last = Path(args.output_dir) / "last.pt"
        keeps = (f"{last} keeps the last good state: resume from it with lower learning rates"
                 if last.is_file() else "no checkpoint was written yet: lower the learning rates")
        hint = ", or use --amp bf16 instead of fp16" if args.amp == "fp16" else ""
        return cls(f"{what} at epoch {epoch}, step {step}; stopped before updating the weights, and "
                   f"{keeps}{hint}")


def train_step(run, images, captions, lengths, step, stop, captions_per_image=1):
    """One teacher-forced optimisation step on images (n, 3, S, S) and captions (B, L), lengths (B,),
    B = n * K with an image's K = `captions_per_image` captions in consecutive rows (see `caption_rows`).
    Returns (loss, real-word scores (N, V) and targets (N,), whether any process was asked to stop,
    the step's figures for the curves: {name: float}, empty when logging is off).
    Raises TrainingDiverged instead of applying an update that is not finite."""
    args, optimizers = run.args, run.active_optimizers()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    hard = args.attention == "hard"
    with autocast(run.device, args.amp):
        scores, alphas, decode_lengths, *locations = run.decoder(run.encoder(images), captions, lengths,
                                                                 captions_per_image, return_locations=hard)
        loss, real_scores, real_targets = caption_loss(scores, captions, decode_lengths, alphas, args.alpha_c)
        objective, reward_sum, sampled = loss, 0.0, 0
        if hard:  # REINFORCE and the entropy bonus: gradients, but not part of the reported loss
            hard_terms, reward_sum, sampled = hard_attention_terms(
                scores, captions, decode_lengths, alphas, locations[0], run.progress.hard_baseline,
                args.hard_reinforce_weight, args.hard_entropy)
            objective = loss + hard_terms
    run.scaler.scale(objective).backward()
    for opt in optimizers:
        run.scaler.unscale_(opt)
    # Check before clipping, which would turn an inf gradient into +-grad_clip and hide it, and
    # before the step, which would write NaN into the weights. With fp16 the scaler skips a step
    # with inf/NaN gradients and lowers its scale, which is normal: only the loss counts there.
    bad_grads = False
    if not run.scaler.is_enabled():
        # One norm over all gradients (foreach kernels, not one check per tensor): inf or NaN if
        # any gradient is, or if one is too large (~1e19) to square in float32.
        grads = [p.grad for p in run.trainable if p.grad is not None]
        bad_grads = bool(grads) and not bool(torch.nn.utils.get_total_norm(grads).isfinite())
    figures = step_figures(run, alphas, decode_lengths) if run.log.enabled else {}
    # One small all-reduce keeps every process deciding alike about NaNs and stop signals.
    bad_loss, bad_grads, stop_flag, reward_sum, sampled = all_reduce_sum(
        [float(not torch.isfinite(objective)), float(bad_grads), float(stop.signal is not None), float(reward_sum),
         float(sampled)], run.device, run.world_size)
    epoch = run.progress.epoch
    if bad_loss:
        raise TrainingDiverged.at(f"the loss became {objective.item()}", epoch, step, args)
    if bad_grads:
        raise TrainingDiverged.at(f"a gradient became inf or NaN (loss {loss.item():.4g})", epoch, step, args)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_value_(run.trainable, args.grad_clip)
    for opt in optimizers:
        run.scaler.step(opt)
    run.scaler.update()
    if hard and figures:  # the mean reward of this step's sampled captions, and the b it was compared with
        reward, baseline = reward_sum / max(sampled, 1), run.progress.hard_baseline
        figures.update(hard_reward=reward, hard_baseline=reward if baseline is None else baseline)
    if hard:  # over all processes' captions, so that every process keeps the same b
        run.progress.hard_baseline = updated_baseline(run.progress.hard_baseline, reward_sum, int(sampled),
                                                      args.hard_baseline_decay)
    return loss, real_scores, real_targets, bool(stop_flag), figures


def step_figures(run, alphas, decode_lengths):
    """What the training curves show of a step besides its loss, read after the backward pass and
    before clipping: the gradient's norm, whether clipping changes it, the attention penalty and, for
    hard attention, the attention maps' entropy. One host wait for all of them."""
    grads = [p.grad for p in run.trainable if p.grad is not None]
    figures = gradient_figures(grads, run.args.grad_clip)
    figures["attention_penalty"] = attention_penalty(alphas.detach()).mean()
    if run.args.attention == "hard":
        figures["attention_entropy"] = attention_entropy(alphas, decode_lengths)
    values = torch.stack([v.float() for v in figures.values()]).tolist()
    return dict(zip(figures, values))


def learning_rates(run):
    """{lr_decoder: ..., lr_encoder: ...} of the optimisers in use."""
    return {f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in run.optimizers.items() if opt is not None}


def caption_rows(captions, lengths):
    """A training batch as the decoder takes it: one row per caption, and the image of each.

    A batch of groups, n images with K captions each (n, K, L) and (n, K), becomes n*K rows
    (n*K, L) and (n*K,), the K of an image consecutive, and K; a batch of one caption per image,
    (B, L) and (B,), stays as it is, with K = 1.
    """
    if captions.dim() == 2:
        return captions, lengths, 1
    groups, per_image, length = captions.shape
    return captions.view(groups * per_image, length), lengths.view(-1), per_image  # (n*K, L), (n*K,), K


def exit_after_signal(run, stop):
    """A stop signal ended the epoch: save last.pt, say so, and exit with 128 + the signal's number.
    Under torchrun a process whose own signal has not arrived yet stops with the others (SIGTERM)."""
    signum = stop.signal or signal.SIGTERM
    run.save("last.pt")
    if run.is_main:
        print(f"stopped by signal {signum}; saved {run.args.output_dir / 'last.pt'} (resume with --resume)",
              file=sys.stderr)
    raise SystemExit(128 + signum)


def train_one_epoch(run, loader, stop, show_progress=True, on_step=None):
    """Teacher-forced training over `loader` (the rest of the epoch, when resumed mid-epoch).

    Advances run.progress (samples_done, epoch_sums, steps and captions trained), logs each step to
    run.log, writes last.pt every --save-every steps, and calls `on_step()` after each step when given
    (bench.py times steps with it). Returns whether a stop signal ended the epoch early.
    """
    args, progress = run.args, run.progress
    run.encoder.train()
    run.decoder.train()
    unsynced = Counter()  # this process's sums since they were last added into progress.epoch_sums
    bar = tqdm(loader, desc=f"epoch {progress.epoch}", unit="batch", file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True)
    first_step = progress.samples_done // (args.batch_size * run.world_size)  # > 0 when resumed mid-epoch
    stopped = False
    step_started = time.perf_counter()
    for step, (images, captions, lengths) in enumerate(bar, start=first_step):
        data_seconds = time.perf_counter() - step_started  # waiting for the loader
        images = images.to(run.device, non_blocking=True)
        captions = captions.to(run.device, non_blocking=True)
        lengths = lengths.to(run.device, non_blocking=True)
        captions, lengths, per_image = caption_rows(captions, lengths)
        loss, real_scores, real_targets, stopped, figures = train_step(run, images, captions, lengths, step, stop,
                                                                       per_image)

        trained = captions.shape[0] * run.world_size
        progress.samples_done += trained
        words, loss_value, top5 = real_targets.numel(), loss.item(), top5_correct(real_scores, real_targets)
        unsynced.update(loss=loss_value * words, top5=top5, words=words)
        progress.steps_trained += 1
        progress.captions_trained += trained
        run.log.add_step(progress.steps_trained, progress.captions_trained, {
            "loss": loss_value, "top5": top5 / max(words, 1), **figures, **learning_rates(run),
            "captions": trained, "seconds": time.perf_counter() - step_started, "data_seconds": data_seconds})
        shown = {k: progress.epoch_sums[k] + unsynced[k] for k in EPOCH_SUMS}  # this process's view
        bar.set_postfix(loss=f"{shown['loss'] / max(shown['words'], 1):.3f}",
                        top5=f"{100 * shown['top5'] / max(shown['words'], 1):.1f}%")
        if args.save_every and (progress.samples_done // (args.batch_size * run.world_size)) % args.save_every == 0:
            add_epoch_sums(run, unsynced)
            run.save("last.pt")
        if on_step is not None:
            on_step()
        if stopped:
            break
        step_started = time.perf_counter()
    add_epoch_sums(run, unsynced)
    return stopped


def add_epoch_sums(run, unsynced):
    """Add every process's unsynced sums into run.progress.epoch_sums and clear them. All processes
    call it at the same steps (before a checkpoint, at the epoch's end), so their progress agrees."""
    totals = all_reduce_sum([float(unsynced[k]) for k in EPOCH_SUMS], run.device, run.world_size)
    for key, total in zip(EPOCH_SUMS, totals):
        run.progress.epoch_sums[key] += total
    unsynced.clear()


@torch.no_grad()
def validate(encoder, decoder, loader, word_map, device, amp, alpha_c, beam_size, max_steps, world_size,
             show_progress=False, length_penalty=0.0):
    """Teacher-forced loss and top-5 accuracy on every reference, and BLEU-4 from real decoding.

    With several processes each decodes its shard; the sums are all-reduced and the captions
    gathered, so every process gets the numbers one process would compute on the whole split.
    Returns a dict of metrics and the decoded captions [(image index, token ids)].
    """
    encoder.eval()
    decoder.eval()
    decoder = unwrap(decoder)
    sums = Counter()  # of caption_loss_sums, over the batches of this process's shard
    decoded, references = [], {}
    for images, captions, lengths, indices in tqdm(loader, desc=f"validating (decoding, beam {beam_size})",
                                                   unit="batch", file=sys.stderr, disable=not show_progress,
                                                   dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        batch, per_image, length = captions.shape
        flat_captions = captions.view(batch * per_image, length).to(device)  # (B*C, L)
        flat_lengths = lengths.view(-1).to(device)  # (B*C,)
        with autocast(device, amp):
            features = encoder(images)  # (B, P, E)
            scores, alphas, decode_lengths = decoder(features.repeat_interleave(per_image, dim=0), flat_captions,
                                                     flat_lengths)
            hypotheses = decoder.beam_search(features, word_map["<start>"], word_map["<end>"],
                                             beam_size=beam_size, max_steps=max_steps,
                                             length_penalty=length_penalty)
        # Sums, not batch means, so that the loss does not depend on how the split is batched or sharded.
        sums.update(caption_loss_sums(scores, flat_captions, decode_lengths, alphas))
        for index, hypothesis, caps, lens in zip(indices.tolist(), hypotheses, captions, lengths):
            decoded.append((index, hypothesis))
            references[index] = reference_tokens(caps, lens, word_map)

    sums = dict(zip(sums, all_reduce_sum(list(sums.values()), device, world_size)))
    if world_size > 1:
        gathered = [None] * world_size
        torch_dist.all_gather_object(gathered, (decoded, references))
        decoded = [d for part, _ in gathered for d in part]
        references = {k: v for _, refs in gathered for k, v in refs.items()}
    decoded.sort()
    bleu = bleu_scores([references[i] for i, _ in decoded], [h for _, h in decoded])
    metrics = {"val_tf_loss": loss_from_sums(sums, alpha_c), "val_tf_top5": sums["top5"] / max(sums["words"], 1),
               "val_decoded_bleu4": bleu["bleu4"]}
    return metrics, decoded


def recompute_batchnorm_statistics(encoder, args, epoch, device):
    """PreciseBN: set the running mean and variance of the encoder's trained BatchNorm layers to the
    average statistics of --precise-bn-batches training batches at the current weights.

    Training keeps exponential moving averages (momentum 0.1: mostly the last ten batches), each
    batch seen at slightly older weights; when the weights move fast those averages no longer fit
    them, and validation, decoding and checkpoints run on mismatched statistics. The batches are
    drawn from a generator seeded by seed and epoch, the same on every process, so every process
    computes the same statistics and a resumed run the same as a straight one.
    """
    layers = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if not layers:  # a frozen encoder keeps its BatchNorm layers in eval mode: nothing trained to fit
        return
    images = CaptionDataset(args.data_folder, "train", per_image=True)
    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    batch = max(args.batch_size // args.captions_per_image_per_step, 2)  # the images a training step sees
    picked = torch.randperm(len(images), generator=generator)[: args.precise_bn_batches * batch].tolist()
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None: a cumulative average over every batch from the reset on
    with torch.no_grad(), autocast(device, args.amp):
        for start in range(0, len(picked), batch):
            encoder(torch.stack([images[i][0] for i in picked[start:start + batch]]).to(device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum


# ----------------------------------------------------------------------------------------------
# The epoch loop


def fit(run, train_set, val_loader, loader_options, stop):
    """Train epoch after epoch: validate by decoding, keep the best checkpoint, decay learning
    rates, stop early. Returns the history of per-epoch metrics."""
    args, progress = run.args, run.progress
    sampler = DistributedSampler(train_set, num_replicas=run.world_size, rank=run.rank, shuffle=True,
                                 seed=args.seed)
    max_steps = train_set.manifest["max_len"] + 1  # every word and <end>
    while progress.epoch < args.epochs and progress.epochs_since_improvement < args.early_stop_patience:
        if lr_decay_due(progress, args):
            decay_learning_rates(run.active_optimizers(), args.lr_decay_factor)

        # Train. Resumed mid-epoch, skip the samples this epoch already trained on (every process
        # has trained as many: DistributedSampler pads the shards to equal length). An item, and a
        # sampler index, holds --captions-per-image-per-step captions of one image: shuffling and
        # sharding go by group, so every caption of a group goes to the same step on one process.
        sampler.set_epoch(progress.epoch)
        skip = progress.samples_done // run.world_size // train_set.captions_per_item
        train_loader = DataLoader(train_set, batch_size=args.batch_size // train_set.captions_per_item,
                                  sampler=list(sampler)[skip:], **loader_options)
        started = time.time()
        if train_one_epoch(run, train_loader, stop, show_progress=run.is_main):
            exit_after_signal(run, stop)

        # Validate by decoding, and keep the best epoch.
        if args.precise_bn_batches:
            recompute_batchnorm_statistics(unwrap(run.encoder), args, progress.epoch, run.device)
        metrics, _ = validate(run.encoder, run.decoder, val_loader, run.word_map, run.device, args.amp,
                              args.alpha_c, args.val_beam_size, max_steps, run.world_size,
                              show_progress=run.is_main, length_penalty=args.val_length_penalty)
        improved = metrics["val_decoded_bleu4"] > progress.best_bleu4
        progress.best_bleu4 = max(progress.best_bleu4, metrics["val_decoded_bleu4"])
        progress.epochs_since_improvement = 0 if improved else progress.epochs_since_improvement + 1
        sums = progress.epoch_sums
        progress.history.append({
            "epoch": progress.epoch, "train_loss": sums["loss"] / max(sums["words"], 1),
            "train_top5": sums["top5"] / max(sums["words"], 1),
            **metrics, "decoder_lr": run.optimizers["decoder"].param_groups[0]["lr"],
            "encoder_lr": run.optimizers["encoder"].param_groups[0]["lr"] if run.optimizers["encoder"] else 0.0,
            "seconds": round(time.time() - started, 1),
            **({"hard_baseline": progress.hard_baseline} if args.attention == "hard" else {})})

        # Checkpoints and logs, at the start of the next epoch.
        log_validation(run, val_loader.dataset, max_steps)
        progress.epoch, progress.samples_done = progress.epoch + 1, 0
        progress.epoch_sums = dict.fromkeys(EPOCH_SUMS, 0.0)
        run.save("last.pt", *(["best.pt"] if improved else []))
        if run.is_main:
            write_metrics_csv(args.output_dir / "metrics.csv", progress.history)
            print(epoch_summary(progress.history[-1], args.val_beam_size, improved), file=sys.stderr)
    if run.is_main:
        write_curves(args.output_dir)
    return progress.history


def log_validation(run, val_set, max_steps):
    """To TensorBoard: the epoch's metrics.csv row, and the caption and attention figure of the first
    --log-images validation images (decoded as validation decodes)."""
    args, progress = run.args, run.progress
    run.log.add_epoch(progress.history[-1], progress.captions_trained)
    run.log.add_attention(unwrap(run.encoder), unwrap(run.decoder), val_set, args.log_images, run.word_map,
                          args.val_beam_size, max_steps, run.device, progress.captions_trained)


def epoch_summary(row, beam_size, improved):
    """One line for the terminal at the end of an epoch."""
    return (f"epoch {row['epoch']}: train loss {row['train_loss']:.3f}, val loss (teacher-forced) "
            f"{row['val_tf_loss']:.3f}, val top-5 {100 * row['val_tf_top5']:.1f}%, val BLEU-4 (decoded, beam "
            f"{beam_size}) {row['val_decoded_bleu4']:.4f}{' (best)' if improved else ''}")


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    """Train; returns the history of per-epoch metrics."""
    return launch(train, parse_args(argv))


def launch(run_fn, args):
    """Start this process (torchrun's group when it launched us, the device, the allocator), then
    return run_fn(args, rank, world_size, device); the process group is closed however it ends.
    train.py's and scst.py's main both start here."""
    rank, world_size, device = setup_distributed(args.device)
    keep_freed_memory(device)
    if args.amp != "none" and device.type != "cuda" and rank == 0:
        print(f"note: --amp {args.amp} on {device.type}: torch's CPU autocast runs it; the speed and memory "
              "gains in docs/performance.md are CUDA's", file=sys.stderr)
    try:
        return run_fn(args, rank, world_size, device)
    finally:
        if world_size > 1:
            torch_dist.destroy_process_group()


def train(args, rank, world_size, device):
    """Set the run up (data, models, optimisers, resume) and fit it, once processes and devices are."""
    # The same seed on every process, so all build the same initial weights: DDP broadcasts only
    # the modules it wraps, and a frozen encoder is not wrapped.
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick the fastest kernels

    word_map = read_word_map(args.data_folder)
    train_set = CaptionDataset(args.data_folder, "train", captions_per_item=args.captions_per_image_per_step)
    val_set = CaptionDataset(args.data_folder, "val")
    if len(val_set) < world_size:  # a process with nothing to validate would leave the others waiting
        raise UserError(f"{args.data_folder}: the val split has {len(val_set)} images, fewer than the "
                        f"{world_size} processes; each process needs at least one")

    state = read_resume_checkpoint(args.resume, args, word_map) if args.resume is not None else None
    encoder, decoder = build_models(vars(args), len(word_map), load_weights=state is None)
    if state is not None:
        load_model_weights(args.resume, state, encoder, decoder)
    if world_size > 1:  # from here on each process draws its own dropout masks
        random.seed(args.seed + rank)
        torch.manual_seed(args.seed + rank)
    encoder.to(device)
    decoder.to(device)
    optimizers, scaler = build_optimizers(encoder, decoder, args), build_scaler(device, args.amp)
    progress = resume_training(state, optimizers, scaler, args, world_size) if state is not None else Progress()
    finished = finished_already(progress, args)
    if finished:
        if rank == 0:
            print(f"train.py: nothing left to train: {args.resume} {finished}", file=sys.stderr)
        return progress.history
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        decoder = DistributedDataParallel(decoder, device_ids=device_ids)
        if optimizers["encoder"]:
            encoder = DistributedDataParallel(encoder, device_ids=device_ids)
    run = Run(args, encoder, decoder, optimizers, scaler, progress, word_map, train_set.manifest["image_size"],
              device, rank, world_size, TrainingLog.for_run(args, progress.captions_trained, rank == 0))

    # Loaders draw their workers' base seed from their own generator, not the global RNG, so that
    # creating one does not move the dropout masks: a run resumed mid-epoch creates its loader at
    # another point in the random stream than the run it continues, and must still match it exactly.
    loader_options = dict(num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                          generator=torch.Generator().manual_seed(args.seed + rank))
    # Validation shards are disjoint and unpadded, so no image is counted twice.
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=range(rank, len(val_set), world_size),
                            **loader_options)
    stop = StopRequested()
    previous_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if run.is_main:  # written once SIGINT/SIGTERM would save a checkpoint: the run has started
            args.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(args.output_dir / "args.json", lambda f: json.dump(
                {**plain(vars(args)), "world_size": world_size, "device": str(device)}, f, indent=2))
        return fit(run, train_set, val_loader, loader_options, stop)
    finally:
        run.log.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    run_main(lambda: main(), "train.py")
