"""Self-critical sequence training (Rennie et al. 2017, arXiv 1612.00563): continue a cross-entropy
checkpoint by rewarding the model's own sampled captions with CIDEr-D.

    python scst.py --checkpoint runs/coco/best.pt --data-folder data/coco_packed --output-dir runs/coco_scst
    python scst.py --checkpoint runs/coco/best.pt --data-folder data/coco_packed --output-dir runs/coco_scst \
        --resume runs/coco_scst/last.pt
    torchrun --nproc_per_node=4 scst.py --checkpoint runs/coco/best.pt --data-folder data/coco_packed

Per image it samples --scst-samples captions word by word from the model's distribution (at most
--max-sample-length words), scores each with CIDEr-D against all of that image's references (cider.py,
document frequencies counted once on the training references and kept in the checkpoint), subtracts a
baseline (the reward of the model's own greedy caption, or the mean reward of the image's other
samples) and minimises -(reward - baseline) * log-probability of the sampled words: captions better
than the baseline become likelier, worse ones less likely.

Everything else is train.py's: checkpoints (last.pt, best.pt by validation CIDEr-D of decoded
captions), exact resume mid-epoch, SIGTERM, NaN/inf checks, torchrun, metrics.csv, args.json,
TensorBoard logs (training_log.py; the x axis counts sampled captions: images x --scst-samples)
and curves.png.
Checkpoints load in eval.py and caption.py like train.py's.
"""

import argparse
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import train
from beam_search import LENGTH_PENALTY_HELP
from checkpoints import build_models, load_checkpoint, load_model_weights, set_rng_state
from cider import CiderD, split_references
from datasets import CaptionDataset, decode_tokens, read_word_map
from losses import caption_loss
from plot_metrics import write_curves
from training_log import TrainingLog, gradient_figures
from utils import UserError, atomic_write, run_main

EPOCH_SUMS = ("reward", "baseline", "samples")  # sums over the epoch's samples, for metrics.csv


def parse_args(argv=None):
    """Command-line flags, grouped as data / self-critical training / system."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--checkpoint", type=Path, required=True,
                      help="the cross-entropy checkpoint (train.py's best.pt) to start from")
    data.add_argument("--data-folder", type=Path, required=True,
                      help="output folder of create_input_files.py, with every reference kept in its metadata")
    data.add_argument("--output-dir", type=Path, default=Path("runs/scst"),
                      help="where checkpoints, metrics.csv and args.json go (default runs/scst)")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    scst = parser.add_argument_group("self-critical training")
    scst.add_argument("--scst-samples", type=int, default=5,
                      help="captions sampled per image at each step (default 5)")
    scst.add_argument("--scst-baseline", choices=("greedy", "mean"), default="greedy",
                      help="what a sample's reward is compared with: the image's greedy caption's reward "
                           "(Rennie et al.), or the mean reward of its other samples (default greedy)")
    scst.add_argument("--reward-against", choices=("all", "closest"), default="all",
                      help="the references a caption's CIDEr-D reward is computed against: all of its "
                           "image's (their mean; Rennie et al.), or only the one it matches best, so that "
                           "every phrasing the references use earns in full and the model is not pushed "
                           "onto the one most of them share (docs/self-critical.md). The validation "
                           "CIDEr-D that picks best.pt is computed the same way (default all)")
    scst.add_argument("--max-sample-length", type=int, default=16,
                      help="most words per sampled caption, <end> included (default 16, as "
                           "ruotianluo/self-critical.pytorch on COCO)")
    scst.add_argument("--xe-weight", type=float, default=0.0,
                      help="add this weight times the teacher-forced loss of one reference caption per image "
                           "(train.py's loss; each image's packed captions in turn, step by step) to the "
                           "self-critical loss, a mixed objective as Paulus et al. 2017's: the model learns to "
                           "score while still fitting the references, so its validation loss rises less "
                           "(docs/self-critical.md). Default 0: self-critical loss alone, as Rennie et al.")
    scst.add_argument("--decoder-lr", type=float, default=5e-5,
                      help="Adam learning rate, decoder (default 5e-5, as self-critical.pytorch)")
    scst.add_argument("--encoder-lr", type=float, default=1e-5,
                      help="Adam learning rate, encoder, with --fine-tune-encoder (default 1e-5)")
    scst.add_argument("--fine-tune-encoder", action="store_true",
                      help="also train the encoder (default: frozen, the features of the checkpoint)")
    scst.add_argument("--epochs", type=int, default=10, help="most epochs (default 10)")
    scst.add_argument("--steps-per-epoch", type=int, default=0,
                      help="end an epoch (validate, checkpoint) after this many steps (default 0: the "
                           "whole train split)")
    scst.add_argument("--batch-size", type=int, default=16,
                      help="images per step per process, each with --scst-samples captions (default 16)")
    scst.add_argument("--grad-clip", type=float, default=5.0,
                      help="clip each gradient value to [-c, c] (default 5; 0 = off)")
    scst.add_argument("--val-beam-size", type=int, default=1,
                      help="beam size of the validation decoding whose CIDEr-D picks best.pt (default 1)")
    scst.add_argument("--val-length-penalty", type=float, default=0.0, help=LENGTH_PENALTY_HELP)
    train.add_system_flags(parser.add_argument_group("system"))
    args = parser.parse_args(argv)
    for name in ("scst_samples", "max_sample_length", "epochs", "batch_size", "val_beam_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.xe_weight < 0:
        parser.error("--xe-weight must be 0 or more")
    if args.scst_baseline == "mean" and args.scst_samples < 2:
        parser.error("--scst-baseline mean needs --scst-samples 2 or more (the other samples are the baseline)")
    return args


# ----------------------------------------------------------------------------------------------
# Sampling, rewards and the loss


def sample_captions(decoder, encoder_out, start_token, end_token, num_samples, max_length):
    """Sample `num_samples` captions per image from the model's word distribution, keeping the graph.

    encoder_out (B, P, E). Returns, for the B*S captions (an image's S samples consecutive):
    words (B*S, T) long, log_probs (B*S, T) float (each sampled word's), and counted (B*S, T) bool:
    the words up to and including the first `<end>`, which alone enter the loss.
    """
    encoder_out = encoder_out.repeat_interleave(num_samples, dim=0)  # (B*S, P, E)
    encoder_proj = decoder.project_encoder(encoder_out)  # (B*S, P, A)
    h, c = decoder.init_hidden_state(encoder_out)  # (B*S, D) each
    words = encoder_out.new_full((encoder_out.shape[0],), start_token, dtype=torch.long)  # (B*S,)
    ended = torch.zeros_like(words, dtype=torch.bool)  # (B*S,)
    step_words, step_log_probs, step_counted = [], [], []
    for _ in range(max_length):
        scores, h, c, _ = decoder.decode_step(encoder_out, encoder_proj, words, h, c)  # (B*S, V|D|D)
        log_probs = F.log_softmax(scores, dim=1)  # (B*S, V)
        words = torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)  # (B*S,)
        step_words.append(words)
        step_log_probs.append(log_probs.gather(1, words.unsqueeze(1)).squeeze(1))
        step_counted.append(~ended)  # a word after <end> is padding
        ended = ended | (words == end_token)
        if bool(ended.all()):
            break
    return torch.stack(step_words, 1), torch.stack(step_log_probs, 1), torch.stack(step_counted, 1)  # (B*S, T)


def caption_words(tokens, end_token, rev_word_map):
    """Word lists of token rows (N, T): each cut at its first `<end>`."""
    captions = []
    for row in tokens.tolist():
        captions.append(decode_tokens(row[:row.index(end_token)] if end_token in row else row, rev_word_map))
    return captions


def advantages(rewards, baseline_rewards, num_samples, baseline):
    """reward - baseline of each sample: rewards (B*S,) float; baseline_rewards (B,), the greedy
    captions' (for baseline "greedy"); with "mean", each sample's baseline is the mean reward of its
    image's other S - 1 samples, so an image's advantages sum to zero. Returns (advantages (B*S,),
    baselines (B*S,))."""
    per_image = rewards.view(-1, num_samples)  # (B, S)
    if baseline == "mean":
        baselines = (per_image.sum(dim=1, keepdim=True) - per_image) / (num_samples - 1)  # (B, S)
    else:
        baselines = baseline_rewards.unsqueeze(1).expand_as(per_image)  # (B, S)
    baselines = baselines.reshape(-1)  # (B*S,)
    return rewards - baselines, baselines


def scst_loss(log_probs, counted, advantage):
    """-(reward - baseline) * log-probability of the sampled words, averaged over the counted words:
    log_probs and counted (N, T), advantage (N,)."""
    counted = counted.to(log_probs.dtype)
    return -(advantage.unsqueeze(1) * log_probs * counted).sum() / counted.sum().clamp(min=1)


def reference_in_turn(captions, lengths, turn):
    """Reference number `turn` mod C of each image: captions (B, C, L) and lengths (B, C) -> (B, L), (B,).

    One caption per image per step, as train.py trains, instead of all C (its time: docs/self-critical.md);
    taking them in turn draws no random numbers, so the captions sampled are those of the same run
    without --xe-weight.
    """
    column = turn % captions.shape[1]
    return captions[:, column], lengths[:, column]


def reference_loss(decoder, features, captions, lengths, alpha_c):
    """train.py's teacher-forced loss on reference captions: features (B, P, E), captions (B, C, L) and
    lengths (B, C), or one per image, (B, L) and (B,). The C captions of an image share its features, as
    in train.py's steps grouped by image."""
    rows, row_lengths, per_image = train.caption_rows(captions.to(features.device), lengths.to(features.device))
    scores, alphas, decode_lengths = decoder(features, rows, row_lengths, captions_per_image=per_image)
    return caption_loss(scores, rows, decode_lengths, alphas, alpha_c)[0]


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class ScstProgress:
    """How far a self-critical run has come (train.Progress's fields, with CIDEr-D picking the best)."""

    epoch: int = 0
    samples_done: int = 0  # images of `epoch` already trained, over all processes
    best_cider: float = -1.0
    epochs_since_improvement: int = 0
    history: list = field(default_factory=list)
    epoch_sums: dict = field(default_factory=lambda: dict.fromkeys(EPOCH_SUMS, 0.0))
    steps_trained: int = 0  # since the run began
    captions_trained: int = 0  # captions sampled and trained on since the run began: the curves' x axis


@dataclass
class ScstRun(train.Run):
    """train.Run, with the CIDEr-D scorer (its document frequencies go into every checkpoint), the
    training references and the reverse word map."""

    scorer: CiderD = None
    references: list = None  # per train image, its reference token lists

    def checkpoint(self):
        """train.Run's checkpoint, marked as self-critical and with the scorer's document frequencies."""
        return {**super().checkpoint(), "scst": True, "cider": self.scorer.state_dict()}

    @property
    def rev_word_map(self):
        """Token index -> word."""
        return {v: k for k, v in self.word_map.items()}

    @property
    def reward_closest(self):
        """Whether a caption's CIDEr-D, as reward and as the validation score that picks best.pt, is
        computed against its closest reference only (--reward-against closest)."""
        return self.args.reward_against == "closest"


def scst_step(run, images, indices, step, stop, captions=None, lengths=None):
    """One self-critical update on a batch of images (B, 3, S, S) with their indices (B,) in the train
    split, and, with --xe-weight, their packed captions (B, C, L) and lengths (B, C). Returns (mean
    reward, mean baseline, whether any process was asked to stop, the step's figures for the curves).
    Raises train.TrainingDiverged instead of applying an update that is not finite."""
    args, decoder, word_map = run.args, run.decoder, run.word_map
    start, end, rev_word_map = word_map["<start>"], word_map["<end>"], run.rev_word_map
    references = [run.references[i] for i in indices.tolist()]
    closest = run.reward_closest
    for opt in run.active_optimizers():
        opt.zero_grad(set_to_none=True)
    with train.autocast(run.device, args.amp):
        features = run.encoder(images)  # (B, P, E)
        baseline_rewards = None
        if args.scst_baseline == "greedy":  # the model's own test-time caption, without dropout
            decoder.eval()
            greedy = decoder.greedy_decode(features.detach(), start, end, args.max_sample_length)
            decoder.train()
            baseline_rewards = torch.tensor(run.scorer.scores(
                [decode_tokens(g, rev_word_map) for g in greedy], references, closest), device=run.device)  # (B,)
        tokens, log_probs, counted = sample_captions(decoder, features, start, end, args.scst_samples,
                                                     args.max_sample_length)  # (B*S, T) each
        sampled_refs = [refs for refs in references for _ in range(args.scst_samples)]
        rewards = torch.tensor(run.scorer.scores(caption_words(tokens, end, rev_word_map), sampled_refs, closest),
                               device=run.device)  # (B*S,)
        advantage, baselines = advantages(rewards, baseline_rewards, args.scst_samples, args.scst_baseline)
        loss = scst_loss(log_probs.float(), counted, advantage)
        if args.xe_weight:
            references_now = reference_in_turn(captions, lengths, run.progress.steps_trained)  # (B, L), (B,)
            loss = loss + args.xe_weight * reference_loss(decoder, features, *references_now, args.alpha_c)
    stopped, figures = apply_update(run, loss, step, stop)
    return float(rewards.mean()), float(baselines.mean()), stopped, figures


def apply_update(run, loss, step, stop):
    """Backward, the finite checks of train.train_step, clipping and the optimiser step. Returns
    whether any process was asked to stop, and the figures of the gradient for the curves."""
    args = run.args
    run.scaler.scale(loss).backward()
    if run.world_size > 1:  # sampling is not a forward() that DDP could hook: average the gradients here
        for p in run.trainable:
            if p.grad is not None:
                torch_dist.all_reduce(p.grad)
                p.grad /= run.world_size
    for opt in run.active_optimizers():
        run.scaler.unscale_(opt)
    bad_grads = False
    if not run.scaler.is_enabled():
        grads = [p.grad for p in run.trainable if p.grad is not None]
        bad_grads = bool(grads) and not bool(torch.nn.utils.get_total_norm(grads).isfinite())
    figures = {}
    if run.log.enabled:  # before clipping, as train.step_figures
        figures = gradient_figures([p.grad for p in run.trainable if p.grad is not None], args.grad_clip)
        figures = dict(zip(figures, torch.stack(list(figures.values())).tolist()))
    bad_loss, bad_grads, stop_flag = train.all_reduce_sum(
        [float(not torch.isfinite(loss)), float(bad_grads), float(stop.signal is not None)], run.device,
        run.world_size)
    epoch = run.progress.epoch
    if bad_loss:
        raise train.TrainingDiverged.at(f"the loss became {loss.item()}", epoch, step, args)
    if bad_grads:
        raise train.TrainingDiverged.at(f"a gradient became inf or NaN (loss {loss.item():.4g})", epoch, step, args)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_value_(run.trainable, args.grad_clip)
    for opt in run.active_optimizers():
        run.scaler.step(opt)
    run.scaler.update()
    return bool(stop_flag), figures


def train_one_epoch(run, loader, stop, show_progress=True):
    """Self-critical training over `loader` (the rest of the epoch, when resumed mid-epoch); advances
    run.progress and writes last.pt every --save-every steps. Returns whether a stop signal ended it."""
    args, progress = run.args, run.progress
    run.encoder.train(args.fine_tune_encoder)
    run.decoder.train()
    unsynced = Counter()
    bar = tqdm(loader, desc=f"scst epoch {progress.epoch}", unit="batch", file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True)
    first_step = progress.samples_done // (args.batch_size * run.world_size)
    stopped = False
    step_started = time.perf_counter()
    for step, (images, captions, lengths, indices) in enumerate(bar, start=first_step):
        data_seconds = time.perf_counter() - step_started  # waiting for the loader
        images = images.to(run.device, non_blocking=True)
        reward, baseline, stopped, figures = scst_step(run, images, indices, step, stop, captions, lengths)
        progress.samples_done += images.shape[0] * run.world_size
        sampled = images.shape[0] * args.scst_samples * run.world_size
        progress.steps_trained += 1
        progress.captions_trained += sampled
        run.log.add_step(progress.steps_trained, progress.captions_trained, {
            "reward": reward, "baseline": baseline, **figures, **train.learning_rates(run), "captions": sampled,
            "seconds": time.perf_counter() - step_started, "data_seconds": data_seconds})
        unsynced.update(reward=reward * images.shape[0], baseline=baseline * images.shape[0],
                        samples=images.shape[0])
        shown = {k: progress.epoch_sums[k] + unsynced[k] for k in EPOCH_SUMS}
        bar.set_postfix(reward=f"{shown['reward'] / max(shown['samples'], 1):.3f}",
                        baseline=f"{shown['baseline'] / max(shown['samples'], 1):.3f}")
        if args.save_every and (step + 1) % args.save_every == 0:
            add_epoch_sums(run, unsynced)
            run.save("last.pt")
        if stopped:
            break
        step_started = time.perf_counter()
    add_epoch_sums(run, unsynced)
    return stopped


def add_epoch_sums(run, unsynced):
    """Add every process's unsynced sums into run.progress.epoch_sums and clear them."""
    totals = train.all_reduce_sum([float(unsynced[k]) for k in EPOCH_SUMS], run.device, run.world_size)
    for key, total in zip(EPOCH_SUMS, totals):
        run.progress.epoch_sums[key] += total
    unsynced.clear()


def validate(run, val_loader, val_references, max_steps):
    """train.validate's teacher-forced loss and decoded captions, with their CIDEr-D (the training
    document frequencies) against the val images' references, as the reward computes it (all of them,
    or the closest one with --reward-against closest)."""
    args = run.args
    metrics, decoded = train.validate(run.encoder, run.decoder, val_loader, run.word_map, run.device, args.amp,
                                      args.alpha_c, args.val_beam_size, max_steps, run.world_size,
                                      show_progress=run.is_main, length_penalty=args.val_length_penalty)
    rev_word_map = run.rev_word_map
    hypotheses = [decode_tokens(tokens, rev_word_map) for _, tokens in decoded]
    metrics["val_decoded_cider"] = run.scorer.corpus_score(hypotheses, [val_references[i] for i, _ in decoded],
                                                           closest=run.reward_closest)
    return metrics


# ----------------------------------------------------------------------------------------------
# The epoch loop and the set-up


def fit(run, train_set, val_loader, val_references, loader_options, stop):
    """Epoch after epoch: train, validate by decoding, keep the best CIDEr-D. Returns the history."""
    args, progress = run.args, run.progress
    sampler = DistributedSampler(train_set, num_replicas=run.world_size, rank=run.rank, shuffle=True,
                                 seed=args.seed)
    max_steps = train_set.manifest["max_len"] + 1
    per_epoch = args.steps_per_epoch * args.batch_size or len(sampler)  # images per process per epoch
    while progress.epoch < args.epochs:
        sampler.set_epoch(progress.epoch)
        skip = progress.samples_done // run.world_size
        train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=list(sampler)[:per_epoch][skip:],
                                  **loader_options)
        started = time.time()
        if train_one_epoch(run, train_loader, stop, show_progress=run.is_main):
            train.exit_after_signal(run, stop)
        metrics = validate(run, val_loader, val_references, max_steps)
        improved = metrics["val_decoded_cider"] > progress.best_cider
        progress.best_cider = max(progress.best_cider, metrics["val_decoded_cider"])
        progress.epochs_since_improvement = 0 if improved else progress.epochs_since_improvement + 1
        sums = progress.epoch_sums
        progress.history.append({
            "epoch": progress.epoch, "train_reward": sums["reward"] / max(sums["samples"], 1),
            "train_baseline": sums["baseline"] / max(sums["samples"], 1), **metrics,
            "seconds": round(time.time() - started, 1)})
        train.log_validation(run, val_loader.dataset, max_steps)
        progress.epoch, progress.samples_done = progress.epoch + 1, 0
        progress.epoch_sums = dict.fromkeys(EPOCH_SUMS, 0.0)
        run.save("last.pt", *(["best.pt"] if improved else []))
        if run.is_main:
            train.write_metrics_csv(args.output_dir / "metrics.csv", progress.history)
            row = progress.history[-1]
            print(f"scst epoch {row['epoch']}: train reward {row['train_reward']:.3f} (baseline "
                  f"{row['train_baseline']:.3f}), val CIDEr-D (decoded, beam {args.val_beam_size}, "
                  f"against {args.reward_against} references) "
                  f"{row['val_decoded_cider']:.4f}{' (best)' if improved else ''}", file=sys.stderr)
    if run.is_main and progress.history:
        write_curves(args.output_dir)
    return progress.history


def run_arguments(args, start_state):
    """This run's arguments: the cross-entropy checkpoint's (which build the model, and which eval.py
    and caption.py read back) overridden by scst.py's own."""
    merged = argparse.Namespace(**{**start_state["args"], **vars(args)})
    merged.early_stop_patience = merged.epochs  # train.Run's fields that scst.py does not use
    return merged


def read_starting_point(args, word_map):
    """(path, state) of the checkpoint the run starts from: --resume's self-critical checkpoint, or
    --checkpoint's cross-entropy one."""
    if args.resume is None:
        state = load_checkpoint(args.checkpoint)
        if state.get("scst"):
            raise UserError(f"{args.checkpoint}: is a self-critical checkpoint; pass it as --resume to continue "
                            "that run, or start from a cross-entropy one (train.py's best.pt)")
        path = args.checkpoint
    else:
        state, path = load_checkpoint(args.resume), args.resume
        if not state.get("scst"):
            raise UserError(f"{args.resume}: is not a checkpoint of scst.py; pass it as --checkpoint to start "
                            "self-critical training from it")
        # best.pt's score so far was computed the checkpoint's way (against all references before the flag)
        saved_reward = state["args"].get("reward_against", "all")
        if saved_reward != args.reward_against:
            raise UserError(f"{args.resume}: was trained with --reward-against {saved_reward}; pass the same "
                            "to resume it, or start a new run from a cross-entropy checkpoint")
    if state["word_map"] != word_map:
        raise UserError(f"{path}: its word map differs from {args.data_folder}'s; use the data folder the "
                        "model was trained on")
    return path, state


def main(argv=None):
    """Self-critical training; returns the history of per-epoch metrics."""
    return train.launch(train_scst, parse_args(argv))


def train_scst(args, rank, world_size, device):
    """Set the run up (data, scorer, models, optimisers, resume) and fit it."""
    random.seed(args.seed + rank)  # each process samples its own captions
    torch.manual_seed(args.seed + rank)
    word_map = read_word_map(args.data_folder)
    train_refs, val_refs = split_references(args.data_folder, "train"), split_references(args.data_folder, "val")
    train_set = CaptionDataset(args.data_folder, "train", per_image=True)
    val_set = CaptionDataset(args.data_folder, "val")
    path, state = read_starting_point(args, word_map)
    args = run_arguments(args, state)
    encoder, decoder = build_models(vars(args), len(word_map), load_weights=False)
    load_model_weights(path, state, encoder, decoder)
    encoder.to(device)
    decoder.to(device)
    optimizers, scaler = train.build_optimizers(encoder, decoder, args), train.build_scaler(device, args.amp)
    progress, scorer = ScstProgress(), None
    if state.get("scst"):  # resuming: optimisers, random state, progress and the scorer from the checkpoint
        optimizers["decoder"].load_state_dict(state["decoder_optimizer"])
        if optimizers["encoder"] and state.get("encoder_optimizer"):
            optimizers["encoder"].load_state_dict(state["encoder_optimizer"])
        if world_size == 1:
            set_rng_state(state["rng"])
        progress = ScstProgress(**{f.name: state[f.name] for f in fields(ScstProgress) if f.name in state})
        scorer = CiderD.from_state_dict(state["cider"])
    scorer = scorer or CiderD.from_references(train_refs)  # counted once, then kept in every checkpoint
    run = ScstRun(args, encoder, decoder, optimizers, scaler, progress, word_map, train_set.manifest["image_size"],
                  device, rank, world_size, scorer=scorer, references=train_refs)
    run.log = TrainingLog.for_run(args, progress.captions_trained, run.is_main)
    loader_options = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                          worker_init_fn=train.worker_init, generator=torch.Generator().manual_seed(args.seed + rank))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=range(rank, len(val_set), world_size),
                            **loader_options)
    stop = train.StopRequested()
    previous_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if run.is_main:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(args.output_dir / "args.json", lambda f: json.dump(
                {**train.plain(vars(args)), "world_size": world_size, "device": str(device)}, f, indent=2))
        return fit(run, train_set, val_loader, val_refs, loader_options, stop)
    finally:
        run.log.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    run_main(lambda: main(), "scst.py")
