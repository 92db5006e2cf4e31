"""Train the encoder, attention and decoder with teacher forcing; pick the best epoch by decoded BLEU-4.

    python train.py --data-folder data/coco_packed --output-dir runs/coco
    python train.py --data-folder data/coco_packed --output-dir runs/coco --resume runs/coco/last.pt
    torchrun --nproc_per_node=4 train.py --data-folder data/coco_packed --output-dir runs/coco

Writes into --output-dir: last.pt (every epoch, and every --save-every steps), best.pt (the epoch with
the best validation BLEU-4 from real decoding), metrics.csv (one row per epoch) and args.json.
Under torchrun each process reads its own shard of the data; --batch-size is per process.
"""

import argparse
import csv
import io
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from checkpoints import (ARCH_ARGS, CHECKPOINT_VERSION, build_models, load_checkpoint, load_model_weights,
                         rng_state, save_checkpoint, set_rng_state)
from datasets import CaptionDataset, read_word_map, reference_tokens
from losses import attention_penalty, caption_loss, real_words, top5_correct
from metrics import AverageMeter, bleu_scores
from models import RESNET_ARCHS, RESNET_BLOCKS
from utils import UserError, atomic_write, keep_freed_memory, resolve_device, run_main


def parse_args(argv=None):
    """Command-line flags, grouped as data / model / optimisation / system."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    model.add_argument("--dropout", type=float, default=0.5, help="dropout before the output layer (0.5)")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start the encoder from torchvision's ImageNet weights, downloaded once "
                            "(default); --no-pretrained starts from random weights")
    model.add_argument("--encoder-weights", type=Path, default=None,
                       help="start the encoder from this torchvision state dict file instead")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=120, help="most epochs to train (default 120)")
    opt.add_argument("--batch-size", type=int, default=32,
                     help="captions per step per process: under torchrun the global batch is "
                          "this times the number of processes (default 32)")
    opt.add_argument("--decoder-lr", type=float, default=4e-4, help="Adam learning rate, decoder (4e-4)")
    opt.add_argument("--encoder-lr", type=float, default=1e-4,
                     help="Adam learning rate, encoder, when fine-tuned (1e-4)")
    opt.add_argument("--fine-tune-encoder", action="store_true",
                     help="train encoder blocks 2-4 (all of it when randomly initialised)")
    opt.add_argument("--grad-clip", type=float, default=5.0,
                     help="clip each gradient value to [-c, c], as in the tutorial (default 5; 0 = off)")
    opt.add_argument("--alpha-c", type=float, default=1.0,
                     help="weight of the doubly stochastic attention penalty (default 1)")
    opt.add_argument("--lr-decay-patience", type=int, default=8,
                     help="multiply learning rates by --lr-decay-factor after this many epochs "
                          "without a better validation BLEU-4 (default 8)")
    opt.add_argument("--lr-decay-factor", type=float, default=0.8, help="learning-rate decay (default 0.8)")
    opt.add_argument("--early-stop-patience", type=int, default=20,
                     help="stop after this many epochs without a better validation BLEU-4 (default 20)")
    opt.add_argument("--val-beam-size", type=int, default=1,
                     help="beam size of the decoding that gives validation BLEU-4 (default 1, greedy)")

    system = parser.add_argument_group("system")
    system.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    system.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision on CUDA: bf16, or fp16 with a gradient scaler (default none)")
    system.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    system.add_argument("--resume", type=Path, default=None,
                        help="continue from this checkpoint (last.pt) exactly where it stopped")
    system.add_argument("--save-every", type=int, default=0,
                        help="also write last.pt every N training steps (default 0: each epoch only)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "encoded_size", "val_beam_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------
# Processes and devices


def setup_distributed(device_flag):
    """Start the process group when torchrun launched us; returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_flag)
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


def _worker_init(_):
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
# One epoch of training, and validation


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


def train_one_epoch(encoder, decoder, loader, optimizers, scaler, args, device, epoch, samples_done,
                    world_size, on_step, stop, show_progress):
    """Teacher-forced training over `loader`; returns (loss meter, top-5 meter, samples done, stopped).

    `on_step(samples_done)` runs after every step (periodic checkpoints); `stop` is checked after
    every step, and so is the loss, so that non-finite weights are never saved.
    """
    encoder.train()
    decoder.train()
    trainable = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    losses, top5 = AverageMeter(), AverageMeter()
    progress = tqdm(loader, desc=f"epoch {epoch}", unit="batch", file=sys.stderr,
                    disable=not show_progress, dynamic_ncols=True)
    first_step = samples_done // (args.batch_size * world_size)  # > 0 when resumed mid-epoch
    for step, (images, captions, lengths) in enumerate(progress, start=first_step):
        images = images.to(device, non_blocking=True)
        captions = captions.to(device, non_blocking=True)
        lengths = lengths.to(device, non_blocking=True)

        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with autocast(device, args.amp):
            scores, alphas, decode_lengths = decoder(encoder(images), captions, lengths)
            loss, real_scores, real_targets = caption_loss(scores, captions, decode_lengths, alphas,
                                                           args.alpha_c)
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)
        # Check before clipping, which would turn an inf gradient into +-grad_clip and hide it, and
        # before the step, which would write NaN into the weights. With fp16 the scaler skips a step
        # with inf/NaN gradients and lowers its scale, which is normal: only the loss counts there.
        bad_grads = False
        if not scaler.is_enabled():
            # One norm over all gradients (foreach kernels, not one check per tensor): inf or NaN if
            # any gradient is, or if one is too large (~1e19) to square in float32.
            grads = [p.grad for p in trainable if p.grad is not None]
            bad_grads = bool(grads) and not bool(torch.nn.utils.get_total_norm(grads).isfinite())
        # One small all-reduce keeps every process deciding alike about NaNs and stop signals.
        bad_loss, bad_grads, stop_flag = all_reduce_sum(
            [float(not torch.isfinite(loss)), float(bad_grads), float(stop.signal is not None)], device,
            world_size)
        if bad_loss:
            raise TrainingDiverged.at(f"the loss became {loss.item()}", epoch, step, args)
        if bad_grads:
            raise TrainingDiverged.at(f"a gradient became inf or NaN (loss {loss.item():.4g})", epoch, step,
                                      args)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(trainable, args.grad_clip)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()

        samples_done += images.shape[0] * world_size
        losses.update(loss.item(), real_targets.numel())
        top5.update(top5_correct(real_scores, real_targets) / max(real_targets.numel(), 1),
                    real_targets.numel())
        progress.set_postfix(loss=f"{losses.avg:.3f}", top5=f"{100 * top5.avg:.1f}%")
        on_step(samples_done)
        if stop_flag:
            return losses, top5, samples_done, True
    return losses, top5, samples_done, False


@torch.no_grad()
def validate(encoder, decoder, loader, word_map, device, amp, alpha_c, beam_size, max_steps, world_size):
    """Teacher-forced loss and top-5 accuracy on every reference, and BLEU-4 from real decoding.

    With several processes each decodes its shard; the sums are all-reduced and the captions
    gathered, so every process gets the numbers one process would compute on the whole split.
    Returns a dict of metrics and the decoded captions [(image index, token ids)].
    """
    encoder.eval()
    decoder.eval()
    decoder_module = decoder.module if isinstance(decoder, DistributedDataParallel) else decoder
    word_loss_sum = penalty_sum = num_captions = words = correct = 0.0
    decoded, references = [], {}
    for images, captions, lengths, indices in loader:
        images = images.to(device, non_blocking=True)
        batch, per_image, length = captions.shape
        flat_captions = captions.view(batch * per_image, length).to(device)  # (B*C, L)
        flat_lengths = lengths.view(-1).to(device)  # (B*C,)
        with autocast(device, amp):
            features = encoder(images)  # (B, P, E)
            scores, alphas, decode_lengths = decoder_module(
                features.repeat_interleave(per_image, dim=0), flat_captions, flat_lengths)
            real_scores, real_targets = real_words(scores, flat_captions, decode_lengths)
            hypotheses = decoder_module.beam_search(features, word_map["<start>"], word_map["<end>"],
                                                    beam_size=beam_size, max_steps=max_steps)
        # Sums, not batch means, so that the loss does not depend on how the split is batched or
        # sharded: caption_loss's cross-entropy is per word, its attention penalty per caption.
        word_loss_sum += F.cross_entropy(real_scores, real_targets, reduction="sum").item()
        penalty_sum += attention_penalty(alphas).sum().item()
        num_captions += alphas.shape[0]
        words += real_targets.numel()
        correct += top5_correct(real_scores, real_targets)
        for index, hypothesis, caps, lens in zip(indices.tolist(), hypotheses, captions, lengths):
            decoded.append((index, hypothesis))
            references[index] = reference_tokens(caps, lens, word_map)

    word_loss_sum, penalty_sum, num_captions, words, correct = all_reduce_sum(
        [word_loss_sum, penalty_sum, num_captions, words, correct], device, world_size)
    if world_size > 1:
        gathered = [None] * world_size
        torch_dist.all_gather_object(gathered, (decoded, references))
        decoded = [d for part, _ in gathered for d in part]
        references = {k: v for _, refs in gathered for k, v in refs.items()}
    decoded.sort()
    bleu = bleu_scores([references[i] for i, _ in decoded], [h for _, h in decoded])
    val_tf_loss = word_loss_sum / max(words, 1) + alpha_c * penalty_sum / max(num_captions, 1)
    metrics = {"val_tf_loss": val_tf_loss, "val_tf_top5": correct / max(words, 1),
               "val_decoded_bleu4": bleu["bleu4"]}
    return metrics, decoded


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs


def check_resume_compatible(state, args, path):
    """Refuse to resume with architecture arguments that differ from the checkpoint's."""
    saved = state["args"]
    differing = [f"--{name.replace('_', '-')} {saved[name]} (checkpoint) vs {getattr(args, name)} (now)"
                 for name in ARCH_ARGS if saved.get(name) != getattr(args, name)]
    if differing:
        raise UserError(f"{path}: cannot resume with other architecture arguments: "
                        + "; ".join(differing) + ". Pass the checkpoint's values or start a new run")


def write_metrics_csv(path, history):
    """Rewrite metrics.csv from the whole history, atomically (one row per finished epoch)."""
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def unwrap(module):
    """The plain module under DistributedDataParallel (what checkpoints hold)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    """Train; returns the history of per-epoch metrics."""
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    keep_freed_memory(device)
    try:
        return _train(args, rank, world_size, device)
    finally:
        if world_size > 1:
            torch_dist.destroy_process_group()


def _train(args, rank, world_size, device):
    """The run itself, once processes and devices are set up."""
    is_main = rank == 0
    # The same seed on every process, so all build the same initial weights: DDP broadcasts only
    # the modules it wraps, and a frozen encoder is not wrapped.
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick the fastest kernels

    word_map = read_word_map(args.data_folder)
    train_set = CaptionDataset(args.data_folder, "train")
    val_set = CaptionDataset(args.data_folder, "val")
    if len(val_set) < world_size:  # a process with nothing to validate would leave the others waiting
        raise UserError(f"{args.data_folder}: the val split has {len(val_set)} images, fewer than the "
                        f"{world_size} processes; each process needs at least one")
    max_steps = train_set.manifest["max_len"] + 1  # every word and <end>

    state = None
    if args.resume is not None:
        state = load_checkpoint(args.resume)
        check_resume_compatible(state, args, args.resume)
        if state["word_map"] != word_map:
            raise UserError(f"{args.resume}: its word map differs from {args.data_folder}'s; "
                            "resume on the data folder the run started with")
        # How the encoder was initialised belongs to the run, not to this invocation.
        args.pretrained, args.encoder_weights = state["args"]["pretrained"], state["args"]["encoder_weights"]
    encoder, decoder = build_models(vars(args), len(word_map), load_weights=state is None)
    if state is not None:
        load_model_weights(args.resume, state, encoder, decoder)
    if world_size > 1:  # from here on each process draws its own dropout masks
        random.seed(args.seed + rank)
        torch.manual_seed(args.seed + rank)
    encoder.to(device)
    decoder.to(device)

    encoder_params = [p for p in encoder.parameters() if p.requires_grad]
    decoder_optimizer = torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr)
    encoder_optimizer = torch.optim.Adam(encoder_params, lr=args.encoder_lr) if encoder_params else None
    optimizers = [decoder_optimizer] + ([encoder_optimizer] if encoder_optimizer else [])
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    epoch, samples_done, best_bleu4, since_improvement, history = 0, 0, -1.0, 0, []
    if state is not None:
        decoder_optimizer.load_state_dict(state["decoder_optimizer"])
        if encoder_optimizer and state.get("encoder_optimizer"):
            encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        if state.get("scaler") and args.amp == "fp16":
            scaler.load_state_dict(state["scaler"])
        epoch, samples_done = state["epoch"], state["samples_done"]
        best_bleu4, since_improvement = state["best_bleu4"], state["epochs_since_improvement"]
        history = state["history"]
        if world_size == 1:
            set_rng_state(state["rng"])

    if world_size > 1:
        decoder = DistributedDataParallel(decoder, device_ids=[device.index] if device.type == "cuda" else None)
        if encoder_params:
            encoder = DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(next_epoch, next_samples_done):
        """The whole training state as plain types and state dicts."""
        plain_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        return {
            "format_version": CHECKPOINT_VERSION,
            "encoder": unwrap(encoder).state_dict(), "decoder": unwrap(decoder).state_dict(),
            "decoder_optimizer": decoder_optimizer.state_dict(),
            "encoder_optimizer": encoder_optimizer.state_dict() if encoder_optimizer else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": next_epoch, "samples_done": next_samples_done, "best_bleu4": best_bleu4,
            "epochs_since_improvement": since_improvement, "history": history,
            "args": plain_args, "word_map": word_map, "rng": rng_state(),
            "image_size": train_set.manifest["image_size"],
        }

    def save_mid_epoch(done):
        if is_main and args.save_every and (done // (args.batch_size * world_size)) % args.save_every == 0:
            save_checkpoint(args.output_dir / "last.pt", checkpoint(epoch, done))

    stop = StopRequested()
    previous_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    # Loaders draw their workers' base seed from their own generator, not the global RNG, so that
    # creating one does not move the dropout masks: a run resumed mid-epoch creates its loader at
    # another point in the random stream than the run it continues, and must still match it exactly.
    loader_options = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                          worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(args.seed + rank))
    # Validation shards are disjoint and unpadded, so no image is counted twice.
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=range(rank, len(val_set), world_size),
                            **loader_options)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    try:
        if is_main:  # written once SIGINT/SIGTERM would save a checkpoint: the run has started
            args.output_dir.mkdir(parents=True, exist_ok=True)
            resolved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            atomic_write(args.output_dir / "args.json", lambda f: json.dump(
                {**resolved, "world_size": world_size, "device": str(device)}, f, indent=2))
        while epoch < args.epochs and since_improvement < args.early_stop_patience:
            if samples_done == 0 and since_improvement > 0 and since_improvement % args.lr_decay_patience == 0:
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] *= args.lr_decay_factor
            sampler.set_epoch(epoch)
            # Resuming mid-epoch: skip the samples this epoch already trained on (every process has
            # trained as many: DistributedSampler pads the shards to equal length).
            skip = samples_done // world_size
            train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=list(sampler)[skip:],
                                      **loader_options)
            started = time.time()
            losses, top5, samples_done, stopped = train_one_epoch(
                encoder, decoder, train_loader, optimizers, scaler, args, device, epoch, samples_done,
                world_size, save_mid_epoch, stop, show_progress=is_main)
            if stopped:
                # Under torchrun a process whose own signal has not arrived yet stops with the others.
                signum = stop.signal or signal.SIGTERM
                if is_main:
                    save_checkpoint(args.output_dir / "last.pt", checkpoint(epoch, samples_done))
                    print(f"stopped by signal {signum}; saved {args.output_dir / 'last.pt'} "
                          f"(resume with --resume)", file=sys.stderr)
                raise SystemExit(128 + signum)

            metrics, _ = validate(encoder, decoder, val_loader, word_map, device, args.amp, args.alpha_c,
                                  args.val_beam_size, max_steps, world_size)
            improved = metrics["val_decoded_bleu4"] > best_bleu4
            best_bleu4 = max(best_bleu4, metrics["val_decoded_bleu4"])
            since_improvement = 0 if improved else since_improvement + 1
            loss_sum, top5_sum, words = all_reduce_sum([losses.sum, top5.sum, losses.count], device, world_size)
            history.append({
                "epoch": epoch, "train_loss": loss_sum / max(words, 1), "train_top5": top5_sum / max(words, 1),
                **metrics,
                "decoder_lr": decoder_optimizer.param_groups[0]["lr"],
                "encoder_lr": encoder_optimizer.param_groups[0]["lr"] if encoder_optimizer else 0.0,
                "seconds": round(time.time() - started, 1)})
            epoch, samples_done = epoch + 1, 0
            if is_main:
                state = checkpoint(epoch, 0)
                save_checkpoint(args.output_dir / "last.pt", state)
                if improved:
                    save_checkpoint(args.output_dir / "best.pt", state)
                write_metrics_csv(args.output_dir / "metrics.csv", history)
                print(f"epoch {epoch - 1}: train loss {history[-1]['train_loss']:.3f}, val loss (teacher-forced) "
                      f"{metrics['val_tf_loss']:.3f}, val top-5 {100 * metrics['val_tf_top5']:.1f}%, "
                      f"val BLEU-4 (decoded, beam {args.val_beam_size}) {metrics['val_decoded_bleu4']:.4f}"
                      f"{' (best)' if improved else ''}", file=sys.stderr)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    return history


if __name__ == "__main__":
    run_main(lambda: main(), "train.py")
