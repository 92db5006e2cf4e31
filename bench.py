"""Measure packing, training and decoding speed on this machine; print a markdown table, write JSON.

    python bench.py --quick                       # about 3 minutes on 2 CPU cores
    python bench.py                               # more images, steps and repeats
    python bench.py --device cuda --amp bf16
    python bench.py --sections grouped            # steps grouped by image: about 6 minutes on 2 CPU cores
    python bench.py --sections logging            # training steps with and without TensorBoard logging

Every figure is the median of --repeats timed runs (after an untimed warm-up, except for --quick's
training steps), with random weights, which take as long as trained ones. What runs:
  1. packing: create_input_files.py (default --workers) against the tutorial's method
     (bench_tutorial_pack.py: one process, full decode, bilinear resize, each image written as read)
     on generated 640x480 JPEGs with 5 captions each, packed to 256x256: the whole process (Python
     start-up and imports included) and the steady state (each packer's main() called in this
     process), interleaved; and how far load_image's pixels are from other decodes;
  2. training: the real train.train_one_epoch at batch 32 with the default model (ResNet-101, 14x14,
     512/512/512, --no-pretrained), frozen and fine-tuned, fed by the real CaptionDataset and
     DataLoader (--workers 2) over a set packed here at 256x256; hooks on the modules split each step;
  3. decoding: DecoderWithAttention.beam_search from features (the encoder is not timed) at beam
     1, 3 and 5, 64 images per call against one image per call, for a fixed number of steps; on
     CUDA also how often one call makes the host wait for the GPU (torch.cuda.set_sync_debug_mode);
  4. the decoder's precomputed attention projection against `StepLoopProjectionDecoder`, the same
     model with that projection computed inside the step loop (forward+backward);
  5. grouped steps (--sections grouped, not run by default): training as in 2, at 40 captions a
     step, with --captions-per-image-per-step 5 (8 images and 5 captions of each: the encoder runs on
     8 images) against 1 (40 images), frozen and fine-tuned, one after the other in one run;
  6. logging (--sections logging, not run by default): training steps as in 2 (frozen encoder,
     batch 32, batches read beforehand) with TensorBoard logging at every step (--log-every 1, the
     most it can cost) and without, alternating step by step (off, on, on, off, ...) in one process;
  7. peak memory of each, in one more untimed run: the RSS high-water mark of the process on CPU
     (Linux VmHWM, reset at the run's start; it includes Python, torch and the model, not worker
     processes); torch.cuda.max_memory_allocated on CUDA.
Each section runs in a fresh Python process, so one section's memory does not count in another's.
The table is printed as markdown; everything, with the machine, goes to
runs/bench_<device>[_<amp>][_quick][_<sections>][_default_malloc].json.
"""

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from statistics import median

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

import bench_tutorial_pack
import create_input_files
import losses
import train
import utils
from checkpoints import build_models
from datasets import CaptionDataset
from models import DecoderWithAttention
from utils import keep_freed_memory, load_image

VOCAB = 10000  # COCO's word map at --min-word-freq 5 has about 9,500 words
START, END = VOCAB - 2, VOCAB - 1  # create_input_files.py puts <start> and <end> last
MAX_LEN = 50  # create_input_files.py's default: captions are padded to MAX_LEN + 2 tokens
BATCH_SIZE = 32
GROUPED_BATCH, GROUPED_PER_IMAGE = 40, 5  # captions a step, and captions of an image in a step
DECODE_BATCH = 64
PACK_SIZE = 256
# --quick skips the training warm-up step (the median of 3 leaves out one slow first step).
QUICK = {"pack_images": 400, "train_images": 48, "train_warmup_steps": 0, "decode_steps": 8, "single_images": 4,
         "repeats": 3}
FULL = {"pack_images": 2000, "train_images": 96, "train_warmup_steps": 1, "decode_steps": 20, "single_images": 8,
        "repeats": 5}


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer images, steps and repeats: about 3 minutes on 2 CPU cores")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per figure, at least 3 (default 3 with --quick, else 5)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision for the training section on CUDA, as train.py --amp (default none)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc settings as they are instead of calling "
                             "utils.keep_freed_memory as train.py and eval.py do on the CPU: what it gains")
    parser.add_argument("--sections", type=lambda text: text.split(","), default=list(DEFAULT_SECTIONS),
                        help="the sections to run, comma-separated, from packing,training,decoding,ablation,grouped,"
                             "logging "
                             "(default all but grouped and logging, which add about 6 and 3 minutes on 2 CPU cores); "
                             "packing runs on the CPU whatever --device says")
    parser.add_argument("--json", type=Path, default=None,
                        help="where the results go as JSON (default runs/bench_<device>[_<amp>][_quick]"
                             "[_<sections>][_default_malloc].json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one section
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
    if args.repeats is not None and args.repeats < 3:
        parser.error("--repeats must be at least 3 (every figure is a median)")
    return args


# ----------------------------------------------------------------------------------------------
# Inputs: JPEGs, caption lengths, a packed training set


def caption_word_counts(rng, n):
    """COCO-like caption lengths in words: 8 + Poisson(3), at most 20 (mean about 11)."""
    return np.minimum(8 + rng.poisson(3.0, size=n), 20)


def make_jpegs(folder, count, seed=0):
    """`count` 640x480 JPEGs at quality 90: a colour gradient, Gaussian noise (sigma 40) and six
    filled shapes. The noise makes the files about as large as COCO's (~160 KB on average), so
    entropy decoding costs what it costs on photographs. Returns the paths."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(count):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        gradient = c0 * (xx / 640)[..., None] + c1 * (1 - xx / 640)[..., None] * (yy / 480)[..., None]
        pixels = np.clip(gradient + rng.normal(0, 40, (480, 640, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, s = int(rng.integers(0, 560)), int(rng.integers(0, 400)), int(rng.integers(30, 200))
            box, fill = [x, y, x + s, y + s], tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        path = folder / f"img_{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def pack_training_set(image_paths, output_folder, seed=0):
    """Pack the JPEGs at 256x256 with create_input_files.py, five random captions each (words from a
    VOCAB - 4 word list, COCO-like lengths), all in the training split."""
    rng = np.random.default_rng(seed)
    images = []
    for i, path in enumerate(image_paths):
        sentences = [{"tokens": [f"w{w}" for w in rng.integers(0, VOCAB - 4, n)]}
                     for n in caption_word_counts(rng, 5)]
        images.append({"filepath": "", "filename": path.name, "split": "train", "imgid": i, "sentences": sentences})
    karpathy = output_folder.parent / "bench_captions.json"
    karpathy.write_text(json.dumps({"images": images}))
    create_input_files.main(["--dataset", "coco", "--karpathy-json", str(karpathy),
                             "--image-folder", str(image_paths[0].parent), "--output-folder", str(output_folder),
                             "--image-size", str(PACK_SIZE), "--min-word-freq", "1", "--workers", "2"])


def random_captions(rng, batch_size, device):
    """(B, MAX_LEN + 2) long captions `<start> words <end> <pad>...` and their (B,) lengths."""
    words = caption_word_counts(rng, batch_size)
    captions = torch.zeros(batch_size, MAX_LEN + 2, dtype=torch.long)
    for i, n in enumerate(words):
        captions[i, 0] = START
        captions[i, 1:n + 1] = torch.from_numpy(rng.integers(1, VOCAB - 4, n))
        captions[i, n + 1] = END
    return captions.to(device), torch.from_numpy(words + 2).to(device)


# ----------------------------------------------------------------------------------------------
# Timing and memory


def clock(device):
    """Seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PeakMemory:
    """Peak memory of a `with` block, in MiB.

    CPU: the process's resident set high-water mark (VmHWM), reset at the block's start through
    /proc/self/clear_refs, so it is the peak within the block (Python, torch and the model
    included). Freed heap memory is first handed back to the OS (glibc's malloc_trim), so that
    what an earlier block freed but the allocator kept does not count. Where that is not
    available, ru_maxrss: the peak since the process started.
    CUDA: torch.cuda.max_memory_allocated, reset at the block's start.
    """

    def __init__(self, device):
        self.device = device
        self.mib = None

    @staticmethod
    def method(device):
        """How the figure is measured, in words."""
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        if _can_reset_rss_peak():
            return "process peak RSS during the run (VmHWM reset at its start)"
        return "process peak RSS since it started (ru_maxrss)"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _can_reset_rss_peak():
            gc.collect()
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif _can_reset_rss_peak():
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            self.mib = kib / 1024
        else:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.mib = kib / 1024
        return False


def peak_memory_mib(device, fn):
    """Run fn once more, untimed, and return its peak memory in MiB. Kept out of the timed runs:
    on the CPU the reset hands freed memory back to the system, which the next run would then
    fault in again, as train.py and eval.py (see utils.keep_freed_memory) never do."""
    with PeakMemory(device) as memory:
        fn()
    return memory.mib


def _can_reset_rss_peak():
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


def _malloc_trim():
    """Return freed heap memory to the OS (glibc only; elsewhere nothing happens)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_mib():
    """The process's resident set now, in MiB (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return None


# ----------------------------------------------------------------------------------------------
# 1. Packing


def baseline_plain_open_resize(path, size):
    """BASELINE for bench.py only: decode the whole JPEG and resize it, in one process, no draft mode."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def write_packing_captions(image_paths, json_path, seed=0):
    """A Karpathy-format file for the JPEGs: five COCO-like captions each (words w0..w9995, so about
    9,700 of them reach the word map), 90% train, 5% val, 5% test."""
    rng = np.random.default_rng(seed)
    images = []
    for i, path in enumerate(image_paths):
        sentences = [{"tokens": [f"w{w}" for w in rng.integers(0, VOCAB - 4, n)]}
                     for n in caption_word_counts(rng, 5)]
        split = {0: "val", 1: "test"}.get(i % 20, "train")
        images.append({"filepath": "", "filename": path.name, "split": split, "imgid": i, "sentences": sentences})
    json_path.write_text(json.dumps({"images": images}))


def pixel_differences(paths, reference):
    """Mean and max absolute difference (0-255) of load_image's pixels from reference(path, size)'s."""
    differences = [np.abs(load_image(p, PACK_SIZE).astype(np.int16) - reference(p, PACK_SIZE).astype(np.int16))
                   for p in paths]
    return {"mean": float(np.mean([d.mean() for d in differences])), "max": int(max(d.max() for d in differences))}


def pillow_only_load_image(path, size):
    """load_image with simplejpeg hidden: every JPEG through Pillow's draft mode, as before simplejpeg."""
    saved, utils.simplejpeg = utils.simplejpeg, None
    try:
        return load_image(path, size)
    finally:
        utils.simplejpeg = saved


def section_packing(spec):
    """The tutorial's packing method against create_input_files.py, both on the same JPEGs and captions:
    the whole process (Python start-up and imports included) and the steady state (the packing
    function called in a process that has imported everything), interleaved run by run."""
    paths = [Path(p) for p in spec["paths"]]
    folder, captions, tmp = paths[0].parent, spec["captions"], Path(spec["tmp"])
    here = os.path.dirname(os.path.abspath(__file__))

    def fresh_output_folder(run_name):
        """An empty folder for a run's output, made before its timer starts: deleting the last run's
        output is no part of packing."""
        path = tmp / run_name  # not `folder`, the images' folder above
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return str(path)

    tutorial_args = ["--karpathy-json", captions, "--image-folder", str(folder), "--min-word-freq", "5"]
    ours_args = ["--karpathy-json", captions, "--image-folder", str(folder), "--image-size", str(PACK_SIZE)]
    runs = {
        "tutorial_whole": lambda out: subprocess.run(
            [sys.executable, "bench_tutorial_pack.py", *tutorial_args, "--output-folder", out],
            cwd=here, check=True, capture_output=True),
        "ours_whole": lambda out: subprocess.run(
            [sys.executable, "create_input_files.py", *ours_args, "--output-folder", out],
            cwd=here, check=True, capture_output=True),
        "tutorial_steady": lambda out: quietly(bench_tutorial_pack.main, tutorial_args + ["--output-folder", out]),
        "ours_steady": lambda out: quietly(create_input_files.main, ours_args + ["--output-folder", out]),
    }
    # Warm-up: the files into the page cache, every run once; then the pixels, on the first 200 images.
    for name, run in runs.items():
        run(fresh_output_folder(name))
    check = paths[:200]
    pixels = {"vs_pillow_draft_mode": pixel_differences(check, pillow_only_load_image),
              "vs_full_decode_same_resize": pixel_differences(check, baseline_plain_open_resize),
              "vs_tutorial_full_decode_bilinear": pixel_differences(
                  check, lambda p, size: bench_tutorial_pack.imresize(
                      np.asarray(Image.open(p).convert("RGB")), (size, size)).transpose(2, 0, 1))}
    times = {name: [] for name in runs}
    for _ in range(spec["repeats"]):
        for name, run in runs.items():
            out = fresh_output_folder(name)
            os.sync()  # the last run's output written to disk now, not by the kernel during this run
            start = time.perf_counter()
            run(out)
            times[name].append(time.perf_counter() - start)
    seconds = {name: median(t) for name, t in times.items()}
    return {"images": len(paths), "mean_file_kb": float(np.mean([p.stat().st_size / 1024 for p in paths])),
            "workers": create_input_files.parse_args(ours_args + ["--output-folder", "x"]).workers,
            "seconds": times, "median_seconds": seconds, "pixel_difference": pixels,
            "whole_speedup": seconds["tutorial_whole"] / seconds["ours_whole"],
            "steady_speedup": seconds["tutorial_steady"] / seconds["ours_steady"]}


def quietly(main, argv):
    """Run a packer's main(argv) with its progress bars and messages discarded."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        main(argv)


# ----------------------------------------------------------------------------------------------
# 2. Training


class StepTimer:
    """Times the parts of every step of the real train.train_one_epoch from hooks on its modules,
    parameters and loader, so that the loop itself runs unchanged.

    On CUDA the marks are CUDA events, so timing adds no host synchronisation inside the step; the
    step's end waits for the device once (train_one_epoch's loss.item() does so anyway). Waiting
    for the loader is host time. The copy to the device and zero_grad fall between the parts and
    count in the step's total only.
    """

    def __init__(self, device, encoder, decoder, params):
        self.device = device
        self.marks = {}
        self.steps = []
        self.step_start = self.data_time = None
        encoder.register_forward_pre_hook(lambda *_: self.mark("encoder_start"))
        encoder.register_forward_hook(self._encoder_done)
        decoder.register_forward_pre_hook(lambda *_: self.mark("decoder_start"))
        for p in params:  # the last gradient accumulated ends the backward pass
            p.register_post_accumulate_grad_hook(lambda _p: self.mark("backward_end"))

    def mark(self, name):
        if self.device.type == "cuda":
            self.marks[name] = torch.cuda.Event(enable_timing=True)
            self.marks[name].record()
        else:
            self.marks[name] = time.perf_counter()

    def _between(self, start, end):
        if self.device.type == "cuda":
            return self.marks[start].elapsed_time(self.marks[end]) / 1000
        return self.marks[end] - self.marks[start]

    def _encoder_done(self, _module, _inputs, features):
        self.mark("encoder_end")
        if features.requires_grad:  # fine-tuned: the gradient reaching the features ends the decoder's backward
            features.register_hook(lambda grad: self.mark("encoder_backward_start"))

    def loader(self, loader, steps):
        """Yield `steps` batches of `loader`, timing how long each was waited for."""
        iterator = iter(loader)
        for _ in range(steps):
            self.marks = {}
            self.step_start = time.perf_counter()
            batch = next(iterator)
            self.data_time = time.perf_counter() - self.step_start
            yield batch

    def on_step(self):
        self.mark("step_end")
        end = clock(self.device)
        decoder_end = "encoder_backward_start" if "encoder_backward_start" in self.marks else "backward_end"
        self.steps.append({
            "data": self.data_time,
            "encoder_forward": self._between("encoder_start", "encoder_end"),
            "decoder_forward_backward": self._between("decoder_start", decoder_end),
            "encoder_backward": self._between(decoder_end, "backward_end"),
            "optimiser": self._between("backward_end", "step_end"),
            "step": end - self.step_start,
        })


def calibrate_batchnorm(encoder, images):
    """Give a random encoder's BatchNorm layers running statistics from one batch, as a pretrained
    encoder's layers have. At their initial values (mean 0, variance 1) the frozen random ResNet-101
    amplifies its activations block after block, past fp16's range: the loss is NaN at step 0."""
    layers = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a plain average over the batches seen: here the one batch
        layer.train()
    with torch.no_grad():
        encoder(images)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    encoder.train(encoder.training)  # frozen blocks back to eval mode


def section_training(spec):
    """Captions/s of train.train_one_epoch with the default model, split into its parts: at batch 32,
    or at spec's batch_size captions a step, per_image of each image (train.py's
    --captions-per-image-per-step)."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch_size, per_image = spec.get("batch_size", BATCH_SIZE), spec.get("per_image", 1)
    argv = ["--data-folder", spec["data_folder"], "--no-pretrained", "--batch-size", str(batch_size),
            "--captions-per-image-per-step", str(per_image), "--workers", str(spec["workers"]), "--amp", spec["amp"],
            "--output-dir", spec["tmp"]]
    args = train.parse_args(argv + (["--fine-tune-encoder"] if spec["fine_tune"] else []))
    encoder, decoder = build_models(vars(args), VOCAB)
    encoder.to(device)
    decoder.to(device)
    optimizers = train.build_optimizers(encoder, decoder, args)
    dataset = CaptionDataset(args.data_folder, "train", captions_per_item=per_image)
    run = train.Run(args, encoder, decoder, optimizers, train.build_scaler(device, args.amp), train.Progress(),
                    word_map={}, image_size=dataset.manifest["image_size"], device=device)
    loader = DataLoader(dataset, batch_size=batch_size // per_image, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=train.worker_init,
                        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))
    # The same images for every setting: those of the first 32 captions.
    calibrate_batchnorm(encoder, torch.stack([dataset._image(i // dataset.captions_per_image)
                                              for i in range(BATCH_SIZE)]).to(device))
    timer = StepTimer(device, encoder, decoder, run.trainable)
    warmup = spec["warmup_steps"]
    steps = warmup + spec["repeats"]
    if steps * batch_size > len(dataset) * per_image:
        raise RuntimeError(f"{len(dataset) * per_image} captions packed, {steps * batch_size} needed")
    with PeakMemory(device) as memory:
        train.train_one_epoch(run, timer.loader(loader, steps), train.StopRequested(), show_progress=False,
                              on_step=timer.on_step)
    timed = timer.steps[warmup:]
    parts = {k: median([s[k] for s in timed]) for k in timed[0]}
    return {"fine_tune": spec["fine_tune"], "workers": args.workers, "amp": args.amp, "batch_size": batch_size,
            "per_image": per_image,
            "trainable_encoder_params": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
            "captions_per_s": batch_size / parts["step"], "median_seconds": parts,
            "data_fraction": parts["data"] / parts["step"], "steps": timed, "peak_memory_mib": memory.mib}


def section_logging(spec):
    """Seconds per train.train_one_epoch step with TensorBoard logging at every step and without,
    frozen encoder, batch 32, each batch read before its step is timed, the two settings alternating step by
    step (off, on, on, off: drift in the machine's speed falls on both alike). Also the event file's
    bytes per logged step."""
    from training_log import TrainingLog

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    args = train.parse_args(["--data-folder", spec["data_folder"], "--no-pretrained", "--batch-size", str(BATCH_SIZE),
                             "--amp", spec["amp"], "--output-dir", spec["tmp"], "--log-every", "1"])
    encoder, decoder = build_models(vars(args), VOCAB)
    encoder.to(device)
    decoder.to(device)
    dataset = CaptionDataset(args.data_folder, "train")
    run = train.Run(args, encoder, decoder, train.build_optimizers(encoder, decoder, args),
                    train.build_scaler(device, args.amp), train.Progress(), word_map={},
                    image_size=dataset.manifest["image_size"], device=device)
    calibrate_batchnorm(encoder, torch.stack([dataset[i][0] for i in range(BATCH_SIZE)]).to(device))
    steps = 2 * max(4 * spec["repeats"], 20) + 2  # a warm-up pair, then as many steps of each setting
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    batches = (batch for _ in range(steps) for batch in loader)  # epoch after epoch
    log_dir = Path(spec["tmp"]) / "tensorboard"
    logs = {False: TrainingLog.off(), True: TrainingLog(log_dir, log_every=1)}
    seconds = {False: [], True: []}
    pair_ratios = []  # steps 2k and 2k+1 (k >= 1) are one of each setting
    for i in range(steps):
        batch = next(batches)  # read before the clock starts
        logging = i % 4 in (1, 2)
        run.log = logs[logging]
        started = time.perf_counter()
        train.train_one_epoch(run, [batch], train.StopRequested(), show_progress=False)
        clock(device)
        if i >= 2:
            seconds[logging].append(time.perf_counter() - started)
        if i >= 2 and i % 2:
            pair_ratios.append(seconds[True][-1] / seconds[False][-1])
    work_steps = max(spec["repeats"], 20)
    work = logging_work_seconds(run, logs[True], device, work_steps)
    logs[True].close()
    event_bytes = sum(path.stat().st_size for path in log_dir.iterdir())
    off, on = median(seconds[False]), median(seconds[True])
    return {"batch_size": BATCH_SIZE, "steps_each": len(seconds[True]), "median_seconds_off": off,
            "median_seconds_on": on, "ratio": on / off, "median_pair_ratio": median(pair_ratios),
            "logging_work_seconds": work, "seconds_off": seconds[False], "seconds_on": seconds[True],
            "event_bytes_per_step": event_bytes / (len(seconds[True]) + 1 + work_steps)}  # warm-up step included


def logging_work_seconds(run, log, device, steps):
    """Median seconds of what logging adds to a step, timed alone (far below the steps' own noise):
    train.step_figures on the last step's gradients and a batch's attention maps, and add_step
    writing a point."""
    run.log = log
    lengths = torch.full((BATCH_SIZE,), 12, device=device)  # (B,)
    pixels = run.encoder.encoded_size ** 2
    alphas = torch.softmax(torch.randn(BATCH_SIZE, 12, pixels, device=device), dim=2)  # (B, T, P)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        figures = train.step_figures(run, alphas, lengths)
        run.progress.steps_trained += 1
        log.add_step(run.progress.steps_trained, run.progress.captions_trained, {
            "loss": 1.0, "top5": 0.5, **figures, **train.learning_rates(run), "captions": BATCH_SIZE,
            "seconds": 1.0, "data_seconds": 0.0})
        times.append(time.perf_counter() - started)
    return median(times)


# ----------------------------------------------------------------------------------------------
# 3. Decoding


def section_decoding(spec):
    """Images/s of beam_search from features, batched and one image per call, at fixed length."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    decoder = DecoderWithAttention(vocab_size=VOCAB, encoder_dim=2048, attention_dim=512, embed_dim=512,
                                   decoder_dim=512).to(device).eval()
    with torch.no_grad():
        decoder.fc.bias[END] = -1e4  # <end> is never the best word: every beam runs all the steps
    features = torch.randn(DECODE_BATCH, 196, 2048, device=device)  # (B, P, E) from a 14x14 grid
    steps = spec["steps"]
    results = []
    for beam in (1, 3, 5):
        for mode in ("batched", "single"):
            images = DECODE_BATCH if mode == "batched" else spec["single_images"]
            chunks = [features] if mode == "batched" else [features[i:i + 1] for i in range(images)]

            def run():
                tokens = []
                for chunk in chunks:  # eval.py's call: the captions and their attention maps
                    tokens += decoder.beam_search(chunk, START, END, beam_size=beam, max_steps=steps,
                                                  return_alphas=True)[0]
                if any(len(t) != steps for t in tokens):
                    raise RuntimeError("a caption ended early: the decode length is not fixed")

            decoder.beam_search(chunks[0], START, END, beam_size=beam, max_steps=2)  # warm-up
            times = []
            for _ in range(spec["repeats"]):
                start = clock(device)
                run()
                times.append(clock(device) - start)
            results.append({"beam": beam, "mode": mode, "images": images, "steps": steps, "seconds": times,
                            "images_per_s": images / median(times), "peak_memory_mib": peak_memory_mib(device, run)})
    for beam in (1, 3, 5):
        batched, single = (next(r for r in results if r["beam"] == beam and r["mode"] == m)
                           for m in ("batched", "single"))
        batched["speedup_over_single"] = batched["images_per_s"] / single["images_per_s"]
    section = {"runs": results}
    if device.type == "cuda":  # beam 5, batched
        section["host_waits"] = {
            "beam_search": host_waits(lambda: decoder.beam_search(features, START, END, 5, steps, True))}
    return section


def host_waits(fn):
    """How many times fn makes the host wait for the CUDA device, as torch.cuda.set_sync_debug_mode
    counts them (one warning per synchronising call)."""
    torch.cuda.set_sync_debug_mode("warn")  # outside the count: switching it on warns once itself
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------------------------
# 4. The decoder's precomputation, against the step-loop form


class StepLoopProjectionDecoder(DecoderWithAttention):
    """BASELINE for bench.py only: DecoderWithAttention with the encoder's attention projection
    (B, P, E) -> (B, P, A) computed at every step, as the tutorial does, instead of once per batch
    before the step loop. Its forward is the real one: same weights, same outputs; only where the
    projection is computed differs."""

    def project_encoder(self, encoder_out):
        """Nothing before the step loop: the features go on unprojected (`step` ignores them)."""
        return encoder_out  # (B, P, E)

    def step(self, encoder_out, encoder_proj, embeddings, h, c, read_expectation=None):
        """DecoderWithAttention.step, with the projection of the features (B_t, P, E) made here."""
        encoder_proj = self.attention.encoder_att(encoder_out)  # (B_t, P, A): at every step
        return super().step(encoder_out, encoder_proj, embeddings, h, c, read_expectation)


def ablation_models(device, dropout=0.5, seed=0, **dims):
    """The real decoder and the step-loop baseline with the same weights."""
    dims = {"vocab_size": VOCAB, "encoder_dim": 2048, "attention_dim": 512, "embed_dim": 512, "decoder_dim": 512,
            **dims}
    torch.manual_seed(seed)
    real = DecoderWithAttention(dropout=dropout, **dims).to(device)
    baseline = StepLoopProjectionDecoder(dropout=dropout, **dims).to(device)
    baseline.load_state_dict(real.state_dict())
    return real, baseline


def decoder_loss(decoder, features, captions, lengths, alpha_c=1.0):
    """train.py's loss for one teacher-forced batch."""
    scores, alphas, decode_lengths = decoder(features, captions, lengths)
    return losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c)[0]


def section_ablation(spec):
    """Decoder forward+backward at batch 32 on 14x14x2048 features, real against step-loop baseline."""
    device = torch.device(spec["device"])
    real, baseline = ablation_models(device)
    rng = np.random.default_rng(0)
    features = torch.randn(BATCH_SIZE, 196, 2048, device=device)  # (B, P, E), a frozen encoder's output
    captions, lengths = random_captions(rng, BATCH_SIZE, device)

    # Fair comparison: without dropout both give the same loss and gradients.
    real.eval(), baseline.eval()
    losses, grads = [], []
    for model in (real, baseline):
        model.zero_grad(set_to_none=True)
        loss = decoder_loss(model, features, captions, lengths)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    same_loss = bool(np.isclose(losses[0], losses[1], rtol=1e-5, atol=1e-6))
    same_grads = bool(torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6))
    if not (same_loss and same_grads):
        raise RuntimeError(f"the baseline decoder computes something else: losses {losses}")

    real.train(), baseline.train()
    times = {"real": [], "baseline": []}
    for repeat in range(spec["repeats"] + 1):  # the first round warms up
        captions, lengths = random_captions(rng, BATCH_SIZE, device)
        for name, model in (("real", real), ("baseline", baseline)):  # interleaved: load drifts evenly
            model.zero_grad(set_to_none=True)
            start = clock(device)
            decoder_loss(model, features, captions, lengths).backward()
            elapsed = clock(device) - start
            if repeat:
                times[name].append(elapsed)
    result = {"losses_without_dropout": losses, "same_loss": same_loss, "same_gradients": same_grads}
    for name, model in (("real", real), ("baseline", baseline)):
        model.zero_grad(set_to_none=True)
        peak = peak_memory_mib(device, lambda: decoder_loss(model, features, captions, lengths).backward())
        result[name] = {"seconds": times[name], "median_seconds": median(times[name]),
                        "captions_per_s": BATCH_SIZE / median(times[name]), "peak_memory_mib": peak}
    result["speedup"] = result["baseline"]["median_seconds"] / result["real"]["median_seconds"]
    return result


# ----------------------------------------------------------------------------------------------
# Running the sections, each in a fresh process


SECTIONS = {"packing": section_packing, "training": section_training, "decoding": section_decoding,
            "ablation": section_ablation, "grouped": section_training, "logging": section_logging}
DEFAULT_SECTIONS = ("packing", "training", "decoding", "ablation")


def run_child(spec):
    """Inside the child process: run one section and print its result as the last line."""
    spec = json.loads(spec)
    if not spec["default_malloc"]:
        keep_freed_memory(torch.device(spec.get("device", "cpu")))  # as train.py, eval.py and caption.py do
    rss_after_imports = current_rss_mib()
    try:
        result = SECTIONS[spec["section"]](spec)
    except BaseException:
        # Exit at once: on CUDA a failed training section was seen to hang at interpreter exit,
        # joining DataLoader workers that its traceback's frames still held.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    result["rss_after_imports_mib"] = rss_after_imports
    print("BENCH_RESULT " + json.dumps(result))


def run_section(name, **spec):
    """Run a section in a fresh Python process with the settings in `spec`; returns its result dict."""
    started = time.perf_counter()
    print(f"bench: {name} {'' if 'fine_tune' not in spec else ('fine-tuned ' if spec['fine_tune'] else 'frozen ')}"
          f"{'K=' + str(spec['per_image']) + ' ' if 'per_image' in spec else ''}...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps({"section": name, **spec})],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench.py: error: the {name} section failed (exit code {proc.returncode})")
    result = json.loads(lines[-1][len("BENCH_RESULT "):])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def machine_info(device, amp):
    """The machine, software and load the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device, "amp": amp, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def targets(results):
    """The speed targets among the sections run (packing 3x the plain loop, batched beam search 10x one
    image at a time, the decoder 4x its step-loop form): the measured figure, what is wanted, and whether
    it is met."""
    figures = {}
    if "packing" in results:
        for kind in ("whole", "steady"):
            figures[f"packing speed-up over the tutorial's method, {kind}"] = (
                results["packing"][f"{kind}_speedup"], ">= 3", lambda x: x >= 3)
    if "training" in results:
        frozen = next(t for t in results["training"] if not t["fine_tune"])
        figures["data time / step time, frozen encoder"] = (frozen["data_fraction"], "< 0.1", lambda x: x < 0.1)
    if "decoding" in results:
        beam5 = next(r for r in results["decoding"]["runs"] if r["beam"] == 5 and r["mode"] == "batched")
        figures["beam 5 batched / one at a time"] = (beam5["speedup_over_single"], ">= 10", lambda x: x >= 10)
    if "ablation" in results:
        figures["decoder precompute speed-up"] = (results["ablation"]["speedup"], ">= 4", lambda x: x >= 4)
    if "logging" in results:
        figures["step time with / without logging at every step"] = (results["logging"]["ratio"], "< 1.02",
                                                                      lambda x: x < 1.02)
    for setting, wanted in (("frozen", 3.0), ("fine-tuned", 3.5)):
        if "grouped" in results:
            figures[f"{GROUPED_PER_IMAGE} captions per image per step / 1, {setting} encoder"] = (
                results["grouped_speedup"][setting], f">= {wanted}", lambda x, wanted=wanted: x >= wanted)
    return {name: {"measured": value, "wanted": wanted, "met": bool(ok(value))}
            for name, (value, wanted, ok) in figures.items()}


def round_speedups(seconds, kind):
    """The tutorial's time over ours for each round of `kind` ("whole" or "steady"), as "lowest-highest":
    how far one round strays from the median, which moves with the tutorial's one-core speed."""
    ratios = [tutorial / ours for tutorial, ours in zip(seconds[f"tutorial_{kind}"], seconds[f"ours_{kind}"])]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def packing_table(p):
    s, n, pixels = p["median_seconds"], p["images"], p["pixel_difference"]
    return [f"| Packing {n} 640x480 JPEGs (~{p['mean_file_kb']:.0f} KB) to 256x256 | whole process (s) "
            "| steady state (images/s) |", "|---|---:|---:|",
            f"| tutorial's method (`bench_tutorial_pack.py`: 1 process, full decode, bilinear) "
            f"| {s['tutorial_whole']:.2f} | {n / s['tutorial_steady']:.0f} |",
            f"| `create_input_files.py` (simplejpeg, --workers {p['workers']}) "
            f"| {s['ours_whole']:.2f} | {n / s['ours_steady']:.0f} |",
            f"| speed-up | **{p['whole_speedup']:.2f}x** | **{p['steady_speedup']:.2f}x** |",
            f"| speed-up, round by round (lowest-highest) | {round_speedups(p['seconds'], 'whole')} "
            f"| {round_speedups(p['seconds'], 'steady')} |",
            "", "| load_image's pixels against (mean / max absolute difference, 0-255, first 200 images) | |",
            "|---|---:|"] + [f"| {name.replace('_', ' ')} | {d['mean']:.3f} / {d['max']} |" for name, d in pixels.items()]


def training_table(training, title="Training, batch 32", show_grouping=False):
    lines = [f"| {title}, ResNet-101 14x14, 512/512/512 | captions/s | data | encoder fwd "
             "| decoder fwd+bwd | encoder bwd | optimiser (+ grad checks, clipping) | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in training:
        s = t["median_seconds"]
        share = lambda k: f"{1000 * s[k]:.0f} ms ({100 * s[k] / s['step']:.0f}%)"  # noqa: E731
        setting = "fine-tuned encoder" if t["fine_tune"] else "frozen encoder"
        grouping = f"K={t['per_image']}, " if show_grouping else ""
        lines.append(f"| {setting} ({grouping}--workers {t['workers']}"
                     f"{', --amp ' + t['amp'] if t['amp'] != 'none' else ''}) "
                     f"| {t['captions_per_s']:.1f} | {share('data')} | {share('encoder_forward')} "
                     f"| {share('decoder_forward_backward')} | {share('encoder_backward')} | {share('optimiser')} "
                     f"| {t['peak_memory_mib']:.0f} |")
    return lines


def grouped_table(results):
    """training_table at GROUPED_BATCH captions a step, K captions per image, and the speed-ups."""
    lines = training_table(results["grouped"], f"Training, {GROUPED_BATCH} captions a step, K per image",
                           show_grouping=True)
    speedup = results["grouped_speedup"]
    lines.append(f"| speed-up of K={GROUPED_PER_IMAGE} over K=1 in captions/s: frozen **{speedup['frozen']:.2f}x**, "
                 f"fine-tuned **{speedup['fine-tuned']:.2f}x** | | | | | | | |")
    return lines


def logging_table(logging):
    """training steps with and without TensorBoard logging, side by side."""
    return [f"| Training step, frozen encoder, batch {logging['batch_size']}, ResNet-101 14x14 | median s "
            f"({logging['steps_each']} steps each) |", "|---|---:|",
            f"| without logging (--no-tensorboard) | {logging['median_seconds_off']:.3f} |",
            f"| with TensorBoard logging at every step (--log-every 1) | {logging['median_seconds_on']:.3f} |",
            f"| ratio with / without (median of the pairs of neighbouring steps) | **{logging['ratio']:.3f}** "
            f"({logging['median_pair_ratio']:.3f}) |",
            f"| what logging adds to a step, timed alone | {logging['logging_work_seconds']:.4f} |",
            f"| event file bytes per logged step | {logging['event_bytes_per_step']:.0f} |"]


def grouped_speedups(grouped):
    """captions/s with GROUPED_PER_IMAGE captions per image over 1, for the frozen and the fine-tuned encoder."""
    def speed(fine_tune, per_image):
        return next(t["captions_per_s"] for t in grouped if t["fine_tune"] == fine_tune and t["per_image"] == per_image)
    return {name: speed(fine_tune, GROUPED_PER_IMAGE) / speed(fine_tune, 1)
            for name, fine_tune in (("frozen", False), ("fine-tuned", True))}


def decoding_table(decoding):
    runs = decoding["runs"]
    steps = runs[0]["steps"]
    lines = [f"| Beam search from features (encoder not timed), {steps} steps, images/s | beam 1 | beam 3 | beam 5 |",
             "|---|---:|---:|---:|"]
    for mode, label in (("batched", f"{DECODE_BATCH} images per call"), ("single", "1 image per call")):
        row = [r for r in runs if r["mode"] == mode]
        lines.append(f"| {label} | " + " | ".join(f"{r['images_per_s']:.2f}" for r in row) + " |")
    batched = [r for r in runs if r["mode"] == "batched"]
    lines.append("| speed-up of batching | "
                 + " | ".join(f"**{r['speedup_over_single']:.1f}x**" for r in batched) + " |")
    lines.append("| peak memory, batched / single (MiB) | " + " | ".join(
        f"{r['peak_memory_mib']:.0f} / {s['peak_memory_mib']:.0f}"
        for r, s in zip(batched, [r for r in runs if r["mode"] == "single"])) + " |")
    if "host_waits" in decoding:
        waits = decoding["host_waits"]
        lines += ["", f"Host waits for the GPU in one batched beam-5 call ({steps} steps), counted by "
                      f"torch.cuda.set_sync_debug_mode: **{waits['beam_search']}** (beam search reads on the "
                      f"host at every step which images are done)."]
    return lines


def ablation_table(a):
    lines = ["| Decoder forward+backward, batch 32, 14x14x2048 features | ms | captions/s | peak memory (MiB) |",
             "|---|---:|---:|---:|"]
    for name, label in (("real", "`DecoderWithAttention` (projection once per batch)"),
                        ("baseline", "`StepLoopProjectionDecoder` (projection at every step)")):
        lines.append(f"| {label} | {1000 * a[name]['median_seconds']:.0f} | {a[name]['captions_per_s']:.0f} "
                     f"| {a[name]['peak_memory_mib']:.0f} |")
    lines.append(f"| speed-up (same weights, same loss: {a['same_loss']}) | **{a['speedup']:.1f}x** | | |")
    return lines


TABLES = {"packing": packing_table, "training": training_table, "decoding": decoding_table,
          "ablation": ablation_table, "grouped": grouped_table, "logging": logging_table}


def markdown(results):
    """The results as markdown tables for the README."""
    m, mem = results["machine"], results["memory_method"]
    rss = results.get("packing", {}).get("rss_after_imports_mib")
    lines = [f"Measured {m['date'][:10]} on {m['cpu']} ({m['cpu_cores']} cores"
             + (f", {m['gpu']}" if "gpu" in m else "") + f"), torch {m['torch']}, device {m['device']}"
             + (f", load average {m['load_average_at_start'][0]} at start" if "load_average_at_start" in m else "")
             + f"; medians of {results['repeats']} runs"
             + ("; glibc malloc defaults (--default-malloc)" if results["settings"]["default_malloc"] else "")
             + f". Memory: {mem}"
             + (f"; a process holds {rss:.0f} MiB once Python, torch and this repo's modules are imported"
                if rss else "")
             + "."]
    for name, table in TABLES.items():
        if name in results:
            lines += [""] + (table(results) if name == "grouped" else table(results[name]))
    return "\n".join(lines)


def run_training_sections(args, warmup_steps, repeats, common, tmp):
    """The training and grouped sections that args.sections asks for, on the set packed in `tmp`."""
    results = {}
    spec = dict(**common, device=args.device, amp=args.amp, workers=2, repeats=repeats, warmup_steps=warmup_steps,
                data_folder=str(tmp / "packed"), tmp=str(tmp / "run"))
    if "training" in args.sections:
        results["training"] = [run_section("training", **spec, fine_tune=fine_tune) for fine_tune in (False, True)]
    if "grouped" in args.sections:  # each fine-tuning setting with K=1, then K=5, back to back
        results["grouped"] = [
            run_section("grouped", **spec, fine_tune=fine_tune, batch_size=GROUPED_BATCH, per_image=per_image)
            for fine_tune in (False, True) for per_image in (1, GROUPED_PER_IMAGE)]
        results["grouped_speedup"] = grouped_speedups(results["grouped"])
    if "logging" in args.sections:
        results["logging"] = run_section("logging", **spec)
    return results


def main(argv=None):
    """Run every section and print the table; returns the results dict."""
    args = parse_args(argv)
    if args.child is not None:
        return run_child(args.child)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench.py: error: --device cuda, but torch sees no CUDA device")
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or sizes["repeats"]
    common = {"default_malloc": args.default_malloc}  # every section gets these
    started = time.perf_counter()
    results = {"machine": machine_info(args.device, args.amp), "quick": args.quick, "repeats": repeats,
               "memory_method": PeakMemory.method(torch.device(args.device)),
               "settings": {**sizes, "repeats": repeats, "vocab_size": VOCAB, "batch_size": BATCH_SIZE,
                            "decode_batch": DECODE_BATCH, "caption_words": "8 + Poisson(3), at most 20",
                            "max_len": MAX_LEN, "default_malloc": args.default_malloc}}
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        tmp = Path(tmp)
        (tmp / "jpegs").mkdir()
        if {"packing", "training", "grouped", "logging"} & set(args.sections):  # training packs the first train_images
            paths = make_jpegs(tmp / "jpegs",
                               sizes["pack_images"] if "packing" in args.sections else sizes["train_images"])
        if "packing" in args.sections:
            write_packing_captions(paths, tmp / "packing_captions.json")
            results["packing"] = run_section("packing", **common, paths=[str(p) for p in paths], repeats=repeats,
                                             captions=str(tmp / "packing_captions.json"), tmp=str(tmp / "packing"))
        if {"training", "grouped", "logging"} & set(args.sections):
            pack_training_set(paths[:sizes["train_images"]], tmp / "packed")
        results.update(run_training_sections(args, sizes["train_warmup_steps"], repeats, common, tmp))
    if "decoding" in args.sections:
        results["decoding"] = run_section("decoding", **common, device=args.device,
                                          steps=sizes["decode_steps"], single_images=sizes["single_images"],
                                          repeats=repeats)
    if "ablation" in args.sections:
        results["ablation"] = run_section("ablation", **common, device=args.device, repeats=repeats)
    results["total_seconds"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results)
    results["markdown"] = markdown(results)
    some_sections = "" if args.sections == list(DEFAULT_SECTIONS) else "_" + "-".join(args.sections)
    json_path = args.json or Path("runs") / (f"bench_{args.device}{'_' + args.amp if args.amp != 'none' else ''}"
                                             f"{'_quick' if args.quick else ''}{some_sections}"
                                             f"{'_default_malloc' if args.default_malloc else ''}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(results["markdown"])
    print("\nSpeed targets on this machine (measured, wanted):")
    for name, target in results["targets"].items():
        verdict = "met" if target["met"] else "NOT met"
        print(f"  {name}: {target['measured']:.3g} (wanted {target['wanted']}): {verdict}")
    print(f"({' '.join(['python bench.py'] + (argv if argv is not None else sys.argv[1:]))}: "
          f"{results['total_seconds']:.0f} s; all figures in {json_path})")
    return results


if __name__ == "__main__":
    main()
