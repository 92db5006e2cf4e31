"""Watch a run while it trains: TensorBoard curves and attention images, written by train.py and scst.py.

    tensorboard --logdir runs/coco/tensorboard        # then open http://localhost:6006
    tensorboard --logdir runs                         # every run under runs/, side by side

The x axis of every curve is the number of captions trained on (over all processes), so that runs
with other batch sizes or --captions-per-image-per-step line up. What is logged:
  train/...  every --log-every steps, the means over the steps since the last point: loss, top-5,
             the attention penalty, the gradient's norm before clipping and the fraction of steps
             it was clipped at, each learning rate, step and data-wait time, captions/s; hard
             attention's reward, baseline and attention entropy; SCST's reward and baseline;
  epoch/...  at each validation, every figure of metrics.csv;
  attention/ and caption/  at each validation, the attention figure (caption.py's) and the decoded
             caption of the first --log-images validation images: the slider shows the attention
             sharpening epoch by epoch.
After --resume the curves continue: the checkpoint records how many captions were trained on, and
the new event file tells TensorBoard to drop whatever the stopped run logged past that point.
"""

import argparse
import sys
import threading
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from utils import UserError

LOG_EVERY = 50  # a COCO epoch at batch 32 is ~13,000 steps: ~260 points
# An untrained model babbles up to the longest caption: its figure (and event file) would be ~5x one
# of a real caption. The figure shows the first words; the text has the whole caption.
FIGURE_WORDS = 17  # three rows of caption.py's six panels


def add_logging_flags(group):
    """--tensorboard, --log-every and --log-images, for train.py's and scst.py's system group."""
    group.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                       help="log curves and attention images to <output-dir>/tensorboard (default on; "
                            "--no-tensorboard turns it off)")
    group.add_argument("--log-every", type=int, default=LOG_EVERY,
                       help=f"steps between two points of the training curves (default {LOG_EVERY})")
    group.add_argument("--log-images", type=int, default=4,
                       help="validation images whose caption and attention figure are logged at each "
                            "validation (default 4; 0 = none)")


class TrainingLog:
    """What a run writes to TensorBoard. The training loops hand it plain numbers; it does nothing
    when logging is off (--no-tensorboard, or a process other than rank 0). A disk that refuses the
    event files (full, read-only) gets one warning, and training goes on without them."""

    def __init__(self, log_dir=None, log_every=LOG_EVERY, resume_from=0):
        """Log into `log_dir` (None: log nothing), one training point every `log_every` steps.
        `resume_from`: captions trained on by the checkpoint this run resumes from (0: a new run,
        which replaces the curves of any earlier run in `log_dir`)."""
        self.log_dir = log_dir
        self.log_every = max(log_every, 1)
        self.window, self.window_steps = Counter(), 0  # sums of per-step figures since the last point
        self.writer = None
        if log_dir is not None:
            # Purge from one caption past the checkpoint: what the stopped run logged after it
            # (steps that this run trains again) is dropped; the checkpoint's own points are kept.
            self._guarded(self._open, resume_from + 1)

    @classmethod
    def off(cls):
        """A log that writes nothing."""
        return cls(None)

    @classmethod
    def for_run(cls, args, resume_from, is_main):
        """The log of train.py's or scst.py's run: into <output-dir>/tensorboard on rank 0, unless
        --no-tensorboard."""
        if not (args.tensorboard and is_main):
            return cls.off()
        return cls(Path(args.output_dir) / "tensorboard", args.log_every, resume_from)

    @property
    def enabled(self):
        return self.writer is not None

    def _open(self, purge_step):
        try:
            from torch.utils.tensorboard import SummaryWriter  # imported only when logging is on
        except ImportError:
            raise UserError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                            "(it is in requirements.txt), or pass --no-tensorboard") from None
        quiet_writer_thread_errors()
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def _guarded(self, write, *args):
        """Run `write`; on an OSError warn once and stop logging (the run matters more than its logs)."""
        try:
            write(*args)
        except OSError as exc:
            self.writer = None
            print(f"warning: cannot write the TensorBoard logs in {self.log_dir} ({exc}); training goes on "
                  "without them (metrics.csv and the checkpoints are written as before)", file=sys.stderr)

    # ------------------------------------------------------------------------------------------
    # Per step

    def add_step(self, steps_trained, captions_trained, values):
        """Training step number `steps_trained` of the run brought it to `captions_trained` captions:
        add its figures (name -> float; "captions", "seconds" and "data_seconds" among them) to the
        window, and every log_every steps of the run write the window's means."""
        if not self.enabled:
            return
        self.window.update(values)
        self.window_steps += 1
        if steps_trained % self.log_every == 0:
            self._guarded(self._write_window, captions_trained)

    def _write_window(self, step):
        sums, steps = self.window, self.window_steps
        self.window, self.window_steps = Counter(), 0
        for name, total in sums.items():
            if name != "captions":
                self.writer.add_scalar(f"train/{name}", total / steps, step)
        self.writer.add_scalar("train/captions_per_s", sums["captions"] / max(sums["seconds"], 1e-9), step)

    # ------------------------------------------------------------------------------------------
    # Per epoch

    def add_epoch(self, row, step):
        """Every number of a metrics.csv row, at `step` captions."""
        if self.enabled:
            self._guarded(self._write_epoch, row, step)

    def _write_epoch(self, row, step):
        for name, value in row.items():
            if name != "epoch" and isinstance(value, (int, float)):  # hard_baseline is None before its first step
                self.writer.add_scalar(f"epoch/{name}", value, step)

    def add_attention(self, encoder, decoder, val_set, count, word_map, beam_size, max_steps, device, step):
        """The decoded caption and caption.py's attention figure of the first `count` images of
        `val_set`, at `step` captions. encoder and decoder: the plain (unwrapped) modules."""
        if self.enabled and count > 0:
            self._guarded(self._write_attention, encoder, decoder, val_set, count, word_map, beam_size,
                          max_steps, device, step)

    @torch.no_grad()
    def _write_attention(self, encoder, decoder, val_set, count, word_map, beam_size, max_steps, device, step):
        from caption import attention_figure
        from datasets import decode_tokens

        count = min(count, len(val_set))
        with h5py.File(val_set.path, "r") as f:
            pixels = f["images"][:count]  # (n, 3, S, S) uint8, as packed
        images = torch.stack([val_set[i][0] for i in range(count)]).to(device)  # (n, 3, S, S) normalised
        was_training = encoder.training, decoder.training
        encoder.eval()
        decoder.eval()
        tokens, alphas = decoder.beam_search(encoder(images), word_map["<start>"], word_map["<end>"],
                                             beam_size=beam_size, max_steps=max_steps, return_alphas=True)
        encoder.train(was_training[0])
        decoder.train(was_training[1])
        rev_word_map = {v: k for k, v in word_map.items()}
        hard = getattr(decoder, "attention_type", "soft") == "hard" and getattr(decoder, "hard_read", "") == "argmax"
        figure = Path(self.log_dir) / ".attention.png"  # caption.py draws into a file; read back, then removed
        try:
            for i in range(count):
                words = decode_tokens(tokens[i], rev_word_map)
                attention_figure(pixels[i], words[:FIGURE_WORDS], alphas[i][:FIGURE_WORDS].float().cpu(),
                                 encoder.encoded_size, figure, mark_cells=hard)
                with Image.open(figure) as png:
                    picture = np.asarray(png.convert("RGB"))  # (H, W, 3) uint8
                self.writer.add_image(f"attention/val_image_{i}", picture, step, dataformats="HWC")
                self.writer.add_text(f"caption/val_image_{i}", " ".join(words) or "(empty)", step)
        finally:
            figure.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------

    def flush(self):
        """Put everything logged so far on disk: called before each checkpoint, so that the curves
        reach at least as far as the checkpoint a run may later resume from."""
        if self.enabled:
            self._guarded(self.writer.flush)

    def close(self):
        if self.enabled:
            self._guarded(self.writer.close)
            self.writer = None


def quiet_writer_thread_errors():
    """TensorBoard writes events from a thread of its own, which keeps a disk error for the next
    write to raise (and TrainingLog to report, once) but also lets it end the thread with a
    traceback on stderr. Silence that traceback; every other thread's error is reported as before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_writer_thread", False):
        return

    def hook(args):
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)
    hook.quiets_writer_thread = True
    threading.excepthook = hook


def attention_entropy(alphas, decode_lengths):
    """Mean entropy (nats) of the attention maps of the real steps: alphas (B, T, P), decode_lengths (B,).
    log P for a uniform map, 0 for one that reads a single cell."""
    alphas = alphas.detach().float()
    steps = torch.arange(alphas.shape[1], device=alphas.device).unsqueeze(0) < decode_lengths.unsqueeze(1)  # (B, T)
    entropies = -(alphas * alphas.clamp(min=1e-30).log()).sum(dim=2)  # (B, T)
    return entropies[steps].mean()


def gradient_figures(grads, grad_clip):
    """The gradient's L2 norm and largest |value| before clipping, and whether clipping to
    [-grad_clip, grad_clip] changes it (1.0 or 0.0), as tensors (no host wait)."""
    norm = torch.nn.utils.get_total_norm(grads)
    largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))
    clipped = (largest > grad_clip).float() if grad_clip > 0 else torch.zeros_like(largest)
    return {"grad_norm": norm, "grad_max_abs": largest, "clipped_fraction": clipped}
