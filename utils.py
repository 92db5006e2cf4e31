"""What the scripts share: image loading, the packed-data layout, checkpoints, metrics and meters.

Nothing here runs on import.
"""

import ctypes
import json
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from models import DecoderWithAttention, Encoder, PretrainedWeightsUnavailable

# ----------------------------------------------------------------------------------------------
# Errors a user can fix


class UserError(Exception):
    """A problem with the user's input: the message names the file and what to do."""


def run_main(main_fn, prog):
    """Run a script's main() and turn a UserError into one line on stderr and exit code 1.

    Ctrl-C outside training's own handler (which saves a checkpoint first) exits with code 130 and
    one line, not a traceback.
    """
    try:
        return main_fn()
    except (UserError, PretrainedWeightsUnavailable) as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def resolve_device(flag):
    """--device: "auto" is CUDA when present, else the CPU; anything else as given (cpu, cuda, cuda:1)."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)


def keep_freed_memory(device):
    """For work on the CPU: let glibc keep freed memory for reuse instead of returning it at once.

    PyTorch's CPU allocator caches nothing, and glibc hands every block above its mmap threshold
    (at most 32 MiB) back to the system when freed: the next tensor of that size is a fresh mapping
    whose pages fault in, zero-filled, on first touch, and training and decoding allocate such
    tensors at every step. In bench.py --quick this made frozen-encoder training 1.75x faster and
    batched beam search 1.2x; the price is a higher peak RSS (a process keeps what it freed).
    Returns False, changing nothing, on other devices or where glibc's mallopt is missing (macOS, musl).
    """
    if device.type != "cpu":
        return False  # the CUDA caching allocator already reuses memory; host memory stays as it was
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1))


# ----------------------------------------------------------------------------------------------
# Images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose acts on


def _to_rgb(image):
    """Any Pillow mode -> RGB: transparency over white, 16/32-bit and float scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = values.max() if values.size else 0.0
        # 16-bit data spans 0..65535; 'I' and 'F' have no fixed range, so scale by what is there.
        scale = 255.0 / (65535.0 if image.mode.startswith("I;16") else max(peak, 255.0))
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path, size):
    """Read an image file as a (3, size, size) uint8 array, squashed to a square as in the tutorial.

    Honours EXIF orientation, accepts any mode, and lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8
    scale when that still leaves about `size` pixels a side (Pillow's draft mode): decoding and
    resizing the full file is most of the packing time.

    Raises:
        UserError naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's chatter about odd EXIF or palettes
            with Image.open(path) as image:
                if image.format == "JPEG":
                    # A side may come out up to 1/8 short of `size` (COCO's 640x480 decodes at
                    # 320x240 for 256) and is stretched back by the resize; bench.py measures the
                    # difference this makes against a full decode.
                    draft_side = size - size // 8
                    image.draft("RGB", (draft_side, draft_side))
                if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose would copy every image
                    image = ImageOps.exif_transpose(image)
                image = _to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
                pixels = np.asarray(image, dtype=np.uint8)
    except Exception as exc:  # Pillow raises many types for broken files: all mean "unreadable"
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        reason = reason.replace(f" {str(path)!r}", "")  # Pillow repeats the path
        raise UserError(f"{path}: cannot decode image ({reason})") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, S, S)


def normalize_images(images):
    """uint8 (..., 3, H, W) -> float ImageNet-normalised, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def list_images(path):
    """A file -> [file]; a folder -> its image files, sorted. Raises UserError when there are none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return [path]


# ----------------------------------------------------------------------------------------------
# Files written whole or not at all


def atomic_write(path, write_fn, binary=False):
    """Write `path` through `write_fn(file)` into a temporary file beside it, then rename.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the permissions open() would
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """Atomically write `obj` as indented JSON."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False))


def read_json(path, what):
    """Read a JSON file; a missing or broken file is a UserError naming it and `what` it should be."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (expected {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); expected {what}") from None


# ----------------------------------------------------------------------------------------------
# The packed-data layout written by create_input_files.py

SPLITS = ("train", "val", "test")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<start>", "<end>")
MANIFEST = "manifest.json"
WORD_MAP = "word_map.json"


def split_file(data_folder, split):
    """HDF5 file of one split: images (N, 3, S, S) uint8, captions (N*C, L) int32, lengths (N*C,)."""
    return Path(data_folder) / f"{split}.h5"


def meta_file(data_folder, split):
    """JSON of one split: per image its source file, id and, for the shapes set, its objects."""
    return Path(data_folder) / f"{split}_meta.json"


def read_manifest(data_folder):
    """The manifest of a finished packing run; refuses folders whose packing did not finish."""
    path = Path(data_folder) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{data_folder}: no {MANIFEST}, so this is not a finished create_input_files.py output; "
            "run create_input_files.py (again) with --output-folder pointing here")
    return read_json(path, "a create_input_files.py manifest")


def read_word_map(data_folder):
    """The word map {word: index} of a packed data folder; refuses an unfinished one (its map may be stale)."""
    read_manifest(data_folder)
    return read_json(Path(data_folder) / WORD_MAP, "a word map written by create_input_files.py")


def strip_special(tokens, word_map):
    """Token indices without <start>, <end> and <pad> (what BLEU is computed on, as in the tutorial)."""
    special = {word_map["<start>"], word_map["<end>"], word_map["<pad>"]}
    return [t for t in tokens if t not in special]


def reference_tokens(captions, lengths, word_map):
    """An image's packed captions (C, L) and lengths (C,) -> C lists of word ids without special tokens."""
    return [strip_special(c[:n].tolist(), word_map) for c, n in zip(captions, lengths)]


def decode_tokens(tokens, rev_word_map):
    """Token indices -> words."""
    return [rev_word_map[t] for t in tokens]


# ----------------------------------------------------------------------------------------------
# Models and checkpoints

CHECKPOINT_VERSION = 1
# Arguments that fix the shapes of the weights: a checkpoint can only be resumed or loaded with these.
ARCH_ARGS = ("encoder_arch", "encoder_cut_after", "encoded_size", "attention_dim", "embed_dim",
             "decoder_dim")


def build_models(args, vocab_size, load_weights=True):
    """Encoder and decoder from a dict of train.py's arguments (its own, or a checkpoint's).

    load_weights=False builds the architecture only, for weights read from a checkpoint next.
    """
    encoder = Encoder(
        arch=args["encoder_arch"], encoded_size=args["encoded_size"], pretrained=args["pretrained"],
        weights_path=args["encoder_weights"], fine_tune=args["fine_tune_encoder"],
        cut_after=args["encoder_cut_after"], load_weights=load_weights)
    decoder = DecoderWithAttention(
        vocab_size=vocab_size, encoder_dim=encoder.encoder_dim, attention_dim=args["attention_dim"],
        embed_dim=args["embed_dim"], decoder_dim=args["decoder_dim"], dropout=args["dropout"])
    return encoder, decoder


def save_checkpoint(path, state):
    """Atomically save a checkpoint dict (plain types and state dicts only)."""
    atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path):
    """Load a checkpoint saved by train.py, with weights_only=True; UserError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes), not a checkpoint written by train.py")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise UserError(f"{path}: not a PyTorch zip archive, so not a checkpoint written by train.py")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only=True raises for anything but plain types
        raise UserError(f"{path}: holds pickled Python objects (a whole model, as the original tutorial "
                        "saved?) rather than the plain state dicts train.py writes; refusing to unpickle "
                        "it, since that could run arbitrary code") from None
    except Exception as exc:  # torch raises many types for damaged archives
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"{path}: not a checkpoint written by train.py ({reason[:200]})") from None
    required = {"format_version", "encoder", "decoder", "args", "word_map"}
    if not isinstance(state, dict) or not required <= state.keys():
        raise UserError(f"{path}: not a checkpoint written by train.py (missing keys)")
    if state["format_version"] != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format {state['format_version']} is not "
                        f"{CHECKPOINT_VERSION}, the one this code reads")
    return state


def models_from_checkpoint(path, device):
    """Rebuild encoder and decoder from a checkpoint alone; returns (encoder, decoder, state)."""
    state = load_checkpoint(path)
    try:
        encoder, decoder = build_models(state["args"], len(state["word_map"]), load_weights=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: its arguments do not describe a model this code builds "
                        f"({exc.__class__.__name__}: {exc})") from None
    load_model_weights(path, state, encoder, decoder)
    return encoder.to(device).eval(), decoder.to(device).eval(), state


def load_model_weights(path, state, encoder, decoder):
    """Load a checkpoint's weights; UserError naming the tensors that do not fit the modules."""
    problems = []
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        saved, expected = state[name], module.state_dict()
        if not isinstance(saved, dict):
            problems.append(f"{name} is not a state dict")
            continue
        problems += [f"{name}.{k} missing" for k in sorted(expected.keys() - saved.keys())]
        problems += [f"{name}.{k} unexpected" for k in sorted(saved.keys() - expected.keys())]
        problems += [f"{name}.{k} is {tuple(getattr(saved[k], 'shape', ()))}, the model's is "
                     f"{tuple(expected[k].shape)}" for k in sorted(expected.keys() & saved.keys())
                     if getattr(saved[k], "shape", None) != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(f"{path}: its weights do not fit the model its own arguments and word map "
                        f"({len(state['word_map'])} words) describe: {shown}; the file was edited, or "
                        "written by another version of train.py")
    encoder.load_state_dict(state["encoder"])
    decoder.load_state_dict(state["decoder"])


def check_word_maps_match(checkpoint_word_map, data_folder, checkpoint_path):
    """Refuse a data folder packed with another vocabulary than the checkpoint's."""
    data_word_map = read_word_map(data_folder)
    if data_word_map != checkpoint_word_map:
        raise UserError(
            f"{Path(data_folder) / WORD_MAP} differs from the word map inside {checkpoint_path}; "
            "evaluate on the data folder the model was trained on")


def rng_state():
    """The random states a resumed run needs to continue exactly (dropout, sampling)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Metrics


def bleu_scores(references, hypotheses):
    """Corpus BLEU-1..4 (nltk), each hypothesis against all references of its image.

    references: list over images of lists of token lists; hypotheses: list of token lists.
    """
    from nltk.translate.bleu_score import corpus_bleu

    weights = {1: (1.0,), 2: (0.5, 0.5), 3: (1 / 3,) * 3, 4: (0.25,) * 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when a short corpus has no 4-gram matches
        return {f"bleu{n}": float(corpus_bleu(references, hypotheses, weights=w))
                for n, w in weights.items()}


def coco_caption_metrics(references, hypotheses):
    """METEOR, ROUGE-L and CIDEr from pycocoevalcap, on already tokenised words.

    Returns (scores, notes): METEOR needs Java; without it, notes says so and the rest is reported.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h) if h else "<empty>"] for i, h in enumerate(hypotheses)}
    scores = {"rougeL": float(Rouge().compute_score(gts, res)[0]),
              "cider": float(Cider().compute_score(gts, res)[0])}
    notes = []
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            meteor.close() if hasattr(meteor, "close") else None
    else:
        notes.append("METEOR skipped: it needs Java (java not found on PATH)")
    return scores, notes


def mentioned_objects(words, colours, shapes):
    """(colour, shape) pairs a caption names: a shape word with a colour word right before it,
    or with one word (a size) between them. Returns a list of (colour, shape, index of shape word).
    """
    found = []
    for i, word in enumerate(words):
        if word in shapes:
            for j in (i - 1, i - 2):
                if j >= 0 and words[j] in colours:
                    found.append((words[j], word, i))
                    break
    return found


def content_scores(hypotheses, objects_per_image):
    """Whether captions name exactly the image's colour+shape objects.

    hypotheses: list of word lists; objects_per_image: list of lists of {"colour", "shape", ...}.
    Returns content accuracy (exact set match) and object precision and recall.
    """
    colours = {o["colour"] for objs in objects_per_image for o in objs}
    shapes = {o["shape"] for objs in objects_per_image for o in objs}
    exact = true_pos = predicted = actual = 0
    for words, objects in zip(hypotheses, objects_per_image):
        named = {(c, s) for c, s, _ in mentioned_objects(words, colours, shapes)}
        present = {(o["colour"], o["shape"]) for o in objects}
        exact += named == present
        true_pos += len(named & present)
        predicted += len(named)
        actual += len(present)
    n = max(len(hypotheses), 1)
    return {"content_accuracy": exact / n, "object_precision": true_pos / max(predicted, 1),
            "object_recall": true_pos / max(actual, 1)}


def box_cells(bbox, grid):
    """Boolean (grid, grid) mask of the encoder cells a normalised box [x0, y0, x1, y1] overlaps."""
    x0, y0, x1, y1 = bbox
    edges = np.arange(grid + 1) / grid
    cols = (edges[:-1] < x1) & (edges[1:] > x0)
    rows = (edges[:-1] < y1) & (edges[1:] > y0)
    return rows[:, None] & cols[None, :]


def grounding_scores(hypotheses, alphas, objects_per_image, grid):
    """Does attention land on the object a word names?

    For each generated shape word (and, separately, colour word) that names an object present in
    the image, a hit is the argmax cell of that step's attention map lying on the object's box
    (mapped to the encoder grid); chance is the share of the grid the box covers.

    hypotheses: list of word lists; alphas: list of (len(words), P) tensors; objects_per_image:
    list of lists of {"colour", "shape", "bbox" (normalised x0, y0, x1, y1)}; grid: sqrt(P).
    """
    totals = {kind: {"hits": 0, "chance": 0.0, "count": 0} for kind in ("shape", "colour")}
    for words, alpha, objects in zip(hypotheses, alphas, objects_per_image):
        for t, word in enumerate(words):
            for kind in ("shape", "colour"):
                targets = [o for o in objects if o[kind] == word]
                if kind == "shape" and len(targets) > 1 and t > 0:
                    # Two objects of one shape: the colour word before it says which is meant.
                    targets = [o for o in targets if o["colour"] in words[max(0, t - 2):t]] or targets
                if not targets:
                    continue
                mask = np.zeros((grid, grid), dtype=bool)
                for o in targets:
                    mask |= box_cells(o["bbox"], grid)
                peak = int(alpha[t].argmax())
                totals[kind]["hits"] += bool(mask.flat[peak])
                totals[kind]["chance"] += mask.mean()
                totals[kind]["count"] += 1
    scores = {}
    for kind, tot in totals.items():
        count = max(tot["count"], 1)
        hit_rate, chance = tot["hits"] / count, tot["chance"] / count
        scores[f"grounding_{kind}_hit_rate"] = hit_rate
        scores[f"grounding_{kind}_chance"] = chance
        scores[f"grounding_{kind}_ratio"] = hit_rate / chance if chance > 0 else None
        scores[f"grounding_{kind}_words"] = tot["count"]
    return scores


# ----------------------------------------------------------------------------------------------
# Meters


class AverageMeter:
    """Running weighted average of a value."""

    def __init__(self):
        self.sum = 0.0
        self.count = 0

    def update(self, value, n=1):
        """Add `value` observed over `n` items."""
        self.sum += value * n
        self.count += n

    @property
    def avg(self):
        """The average so far (0 before any update)."""
        return self.sum / self.count if self.count else 0.0
