"""Checkpoints: building the models from train.py's arguments, saving and loading them safely,
and the random state a resumed run continues from.

    from checkpoints import models_from_checkpoint
    encoder, decoder, state = models_from_checkpoint("runs/demo/train/best.pt", torch.device("cpu"))
"""

import pickle
import random
import re
import shlex
import zipfile
from pathlib import Path

import torch

import safe_unpickle
from datasets import WORD_MAP, read_word_map
from models import DecoderWithAttention, Encoder
from utils import UserError, atomic_write, disk_full


CHECKPOINT_VERSION = 1
# Arguments that fix the shapes of the weights: a checkpoint can only be resumed or loaded with these.
ARCH_ARGS = ("encoder_arch", "encoder_cut_after", "encoded_size", "attention_dim", "embed_dim",
             "decoder_dim", "attention", "output_layer")
# What checkpoints written before an architecture argument existed were built with.
ARCH_DEFAULTS = {"attention": "soft", "output_layer": "linear"}


def arch_arg(args, name):
    """An architecture argument of a dict of train.py's arguments, older checkpoints' default if absent."""
    return args.get(name, ARCH_DEFAULTS.get(name))


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
        embed_dim=args["embed_dim"], decoder_dim=args["decoder_dim"], dropout=args["dropout"],
        attention=arch_arg(args, "attention"), output_layer=arch_arg(args, "output_layer"),
        hard_expectation_prob=args.get("hard_expectation_prob", 0.5))
    return encoder, decoder


def save_checkpoint(path, state):
    """Atomically save a checkpoint dict (plain types and state dicts only).

    Raises:
        UserError naming the file when the disk fills up while writing it; the file saved there
        before, if any, is left whole (atomic_write).
    """
    try:
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        kept = ("the one saved there before is still whole" if Path(path).exists()
                else "no checkpoint was written there")
        raise UserError(f"{path}: the disk filled up while saving this checkpoint ({full.strerror}); {kept}. "
                        "Free some space, then run again (train.py and scst.py continue from last.pt with "
                        "--resume)") from None


def load_checkpoint(path):
    """Load a checkpoint saved by train.py, with weights_only=True; UserError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes), not a checkpoint written by train.py")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        refuse_tutorial_checkpoint(path)
        raise UserError(f"{path}: not a PyTorch zip archive, so not a checkpoint written by train.py; pass the "
                        "best.pt or last.pt in train.py's --output-dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only=True raises for anything but plain types
        refuse_tutorial_checkpoint(path)
        raise UserError(f"{path}: holds pickled Python objects rather than the plain state dicts train.py "
                        "writes; refusing to unpickle it, since that could run arbitrary code; pass the best.pt "
                        "or last.pt in train.py's --output-dir") from None
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


def refuse_tutorial_checkpoint(path):
    """Raise a UserError giving the convert_tutorial.py command when `path` is a checkpoint of sgrvinod's
    tutorial (whole modules pickled, in either of torch.save's formats), found without unpickling it."""
    try:
        names = safe_unpickle.pickled_globals(path)
    except (safe_unpickle.UnreadableFile, zipfile.BadZipFile, OSError):
        return
    if {"models.Encoder", "models.DecoderWithAttention"} & names:
        raise UserError(f"{path}: a checkpoint of the PyTorch tutorial (a-PyTorch-Tutorial-to-Image-Captioning), "
                        f"which this code reads once converted: run `{tutorial_conversion_command(path)}` and "
                        "pass the .pt file it writes instead")


def tutorial_conversion_command(path):
    """The convert_tutorial.py command for the tutorial checkpoint `path`: the word map is the
    tutorial's WORDMAP_<base>.json beside it (the <base> read from the checkpoint's name, or the
    released model's), the output a .pt file of the same name beside it."""
    path = Path(path)
    match = re.fullmatch(r"(?:BEST_)?checkpoint_(.+)\.pth\.tar", path.name)
    siblings = sorted(path.parent.glob("WORDMAP_*.json"))
    if match:
        word_map = path.parent / f"WORDMAP_{match.group(1)}.json"
    elif len(siblings) == 1:
        word_map = siblings[0]
    else:
        word_map = path.parent / "WORDMAP_coco_5_cap_per_img_5_min_word_freq.json"
    stem = path.name[:-len(".pth.tar")] if path.name.endswith(".pth.tar") else path.stem
    output = path.parent / (stem + ("_converted" if path.suffix == ".pt" else "") + ".pt")
    return " ".join(["python convert_tutorial.py checkpoint", "--checkpoint", shlex.quote(str(path)),
                     "--word-map", shlex.quote(str(word_map)), "--output", shlex.quote(str(output))])


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
