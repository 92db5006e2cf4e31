r"""Bring a model and data from sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning over to this code.

    python convert_tutorial.py data --tutorial-folder "caption data" --output-folder data/coco_packed
    python convert_tutorial.py checkpoint \
        --checkpoint BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \
        --word-map "caption data/WORDMAP_coco_5_cap_per_img_5_min_word_freq.json" --output runs/tutorial/best.pt

`data` turns the tutorial's packed folder ({TRAIN,VAL,TEST}_IMAGES_<base>.hdf5, _CAPTIONS_ and
_CAPLENS_<base>.json, WORDMAP_<base>.json) into create_input_files.py's layout without decoding an
image again: the images are copied in chunks, the captions re-read from the JSON files, and the word
map kept as it is, so that a converted checkpoint and converted data fit each other.

`checkpoint` turns a tutorial checkpoint into one of train.py's, which eval.py, caption.py, app.py
and `train.py --resume` read with nothing else: the file PyTorch 0.4 wrote (torch.save's legacy
format, saved from a GPU; the released model is one) or one saved again as a zip archive. The
tutorial pickles whole modules and optimisers, and unpickling runs whatever code the file names;
this first lists the names the file's pickle holds without running anything and refuses any outside
the few a tutorial checkpoint needs, naming them; then it reads the file with an unpickler that
knows those names alone (torch's weights_only one for a zip archive, safe_unpickle.py's for the
legacy format), with inert stand-ins for the tutorial's classes (neither the tutorial's models.py
nor this repo's is imported or run).
"""

import argparse
import random
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

import safe_unpickle
import train
from checkpoints import CHECKPOINT_VERSION, build_models, save_checkpoint
from datasets import MANIFEST, SPECIAL_TOKENS, SPLITS, WORD_MAP, decode_tokens, split_file, strip_special
from models import RESNET_BLOCKS
from packed_data import write_meta
from utils import UserError, disk_full, read_json, run_main, write_json

# ----------------------------------------------------------------------------------------------
# Reading a tutorial checkpoint without running what it names


class Pickled:
    """Inert stand-in for a class a tutorial checkpoint pickles: it keeps the pickled attributes
    (`state`) and runs no code of the class it stands for. `pickled_name` says which class that was."""

    pickled_name = None

    def __new__(cls, *args):
        instance = super().__new__(cls)
        instance.state = {}  # unpickling creates instances without calling __init__
        return instance

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _plain_dict(*args):
    """Stand-in for collections.defaultdict (an optimiser's `state`): a plain dict, filled by the pickle."""
    return {}


def _no_backend():
    """Stand-in for torch.nn.backends.thnn._get_thnn_function_backend, which PyTorch 0.4 pickled as
    every module's `_backend`: nothing here uses a backend."""
    return None


# Every class a tutorial checkpoint holds: its three modules, the torch and torchvision modules
# inside them, and the Adam optimisers.
TUTORIAL_CLASSES = (
    "models.Encoder", "models.Attention", "models.DecoderWithAttention",
    "torchvision.models.resnet.Bottleneck", "torchvision.models.resnet.BasicBlock",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.linear.Linear", "torch.nn.modules.sparse.Embedding",
    "torch.nn.modules.dropout.Dropout", "torch.nn.modules.rnn.LSTMCell",
    "torch.nn.modules.activation.Sigmoid", "torch.nn.modules.activation.Softmax",
    "torch.optim.adam.Adam",
)
STAND_INS = {name: type(name.rsplit(".", 1)[1], (Pickled,), {"pickled_name": name}) for name in TUTORIAL_CLASSES}
# The stand-ins and the functions such a checkpoint calls; tensors, OrderedDicts and sets torch
# allows by itself, and safe_unpickle.tensor_globals() lists for the legacy format.
SAFE_GLOBALS = [(cls, name) for name, cls in STAND_INS.items()] + [
    (_plain_dict, "collections.defaultdict"), (dict, "builtins.dict"),
    (_no_backend, "torch.nn.backends.thnn._get_thnn_function_backend")]
ALLOWED = {**safe_unpickle.tensor_globals(), **{name: obj for obj, name in SAFE_GLOBALS}}
FROM_THE_TUTORIAL = ("convert the checkpoint_<base>.pth.tar or BEST_checkpoint_<base>.pth.tar the tutorial's "
                     "train.py wrote, or the released BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar, "
                     "as downloaded")


def read_tutorial_checkpoint(path):
    """A tutorial checkpoint, in torch.save's zip or legacy (PyTorch 0.4) format, as a dict whose
    modules and optimisers are `Pickled` stand-ins and whose tensors are on the CPU.

    Raises UserError naming any global outside ALLOWED, found by reading the pickle's opcodes before
    anything is unpickled; the unpicklers then resolve ALLOWED alone as well.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; {FROM_THE_TUTORIAL}")
    try:
        refused = sorted(safe_unpickle.pickled_globals(path) - ALLOWED.keys())
    except (safe_unpickle.UnreadableFile, zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path}: not a checkpoint torch.save wrote ({exc}); {FROM_THE_TUTORIAL}") from None
    if refused:
        raise UserError(f"{path}: refusing to unpickle {', '.join(refused)}, which a tutorial checkpoint never "
                        "holds and which could run code, so do not open it with torch.load either; "
                        f"{FROM_THE_TUTORIAL}")
    try:
        if safe_unpickle.is_legacy_file(path):
            state = safe_unpickle.load_legacy(path, ALLOWED)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file, or what the unpicklers refuse beyond the scan above
        raise UserError(f"{path}: cannot be read safely ({str(exc).splitlines()[0][:200]}); "
                        f"{FROM_THE_TUTORIAL}") from None
    if not isinstance(state, dict) or not {"encoder", "decoder"} <= state.keys():
        raise UserError(f"{path}: no 'encoder' and 'decoder' entries, so not a tutorial checkpoint; "
                        f"{FROM_THE_TUTORIAL}")
    for key, name in (("encoder", "models.Encoder"), ("decoder", "models.DecoderWithAttention")):
        if getattr(state[key], "pickled_name", None) != name:
            raise UserError(f"{path}: its '{key}' is not a pickled {name}, so not a tutorial checkpoint "
                            f"(a checkpoint of this repo's train.py needs no conversion); {FROM_THE_TUTORIAL}")
    return state


def module_tensors(module, prefix=""):
    """A pickled module's parameters and persistent buffers by state-dict name (OrderedDict), walked
    from its `_parameters`, `_buffers` and `_modules` as nn.Module.state_dict does."""
    tensors = OrderedDict()
    state = module.state if isinstance(module, Pickled) else {}
    skipped = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if isinstance(tensor, torch.Tensor) and name not in skipped:
                tensors[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(module_tensors(child, f"{prefix}{name}."))
    return tensors


def child(module, *names):
    """A pickled module's submodule by attribute path, or None."""
    for name in names:
        module = (module.state.get("_modules") or {}).get(name) if isinstance(module, Pickled) else None
    return module


# ----------------------------------------------------------------------------------------------
# The tutorial's modules -> this repo's arguments and state dicts

# The tutorial's decoder calls its LSTM cell `decode_step`; everything else has the same name here.
DECODER_RENAMES = {"decode_step.": "lstm."}
# Residual blocks per stage of each torchvision ResNet, and the kind of block.
RESNET_LAYOUTS = {"resnet18": ("BasicBlock", (2, 2, 2, 2)), "resnet34": ("BasicBlock", (3, 4, 6, 3)),
                  "resnet50": ("Bottleneck", (3, 4, 6, 3)), "resnet101": ("Bottleneck", (3, 4, 23, 3)),
                  "resnet152": ("Bottleneck", (3, 8, 36, 3))}


def renamed(tensors, renames):
    """The same tensors, each name's prefix replaced by `renames` where one matches."""
    out = OrderedDict()
    for name, tensor in tensors.items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = tensor
    return out


def tutorial_name(name, renames_back):
    """The tutorial's name of one of this repo's tensors (what an error message should show)."""
    return next(iter(renamed({name: None}, renames_back)))


def encoder_architecture(encoder, path):
    """(arch, cut_after, encoded_size) of a pickled tutorial Encoder: `resnet` (a torchvision ResNet's
    children up to a residual stage) and `adaptive_pool`."""
    stages = children(child(encoder, "resnet"))[4:]  # after conv1, bn1, relu, maxpool
    kinds = {getattr(block, "pickled_name", "?").rsplit(".", 1)[-1] for stage in stages for block in children(stage)}
    counts = tuple(len(children(stage)) for stage in stages)
    arch = next((arch for arch, (kind, layout) in RESNET_LAYOUTS.items()
                 if kinds == {kind} and 1 <= len(counts) <= 4 and layout[:len(counts)] == counts), None)
    if arch is None:
        raise UserError(f"{path}: its encoder.resnet ({len(counts)} stages of {counts} {'/'.join(sorted(kinds))} "
                        "blocks) is not a torchvision ResNet cut after a stage, as the tutorial's is")
    pool = child(encoder, "adaptive_pool")
    size = pool.state.get("output_size") if pool is not None else None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if not isinstance(size[0], int) or size[0] != size[1]:
        raise UserError(f"{path}: its encoder.adaptive_pool has output size {size}, not a square grid")
    return arch, RESNET_BLOCKS[len(counts) - 1], size[0]


def children(module):
    """The submodules of a pickled module (a Sequential's in order); none for anything else."""
    return list((module.state.get("_modules") or {}).values()) if isinstance(module, Pickled) else []


def tensor_shape(tensors, name, path):
    """The shape of decoder tensor `name`; UserError naming it when the checkpoint has none."""
    if name not in tensors:
        raise UserError(f"{path}: its decoder has no tensor {name}, so it is not the tutorial's decoder")
    return tuple(tensors[name].shape)


def model_args(checkpoint, decoder_tensors, path):
    """train.py's arguments for the model a tutorial checkpoint holds (defaults for the rest)."""
    arch, cut_after, encoded_size = encoder_architecture(checkpoint["encoder"], path)
    dropout = child(checkpoint["decoder"], "dropout")
    args = train.plain(vars(train.parse_args(["--data-folder", "."])))
    args.update(
        data_folder=None, output_dir=None, encoder_arch=arch, encoder_cut_after=cut_after,
        encoded_size=encoded_size, pretrained=True, encoder_weights=None,  # the tutorial starts from ImageNet
        attention_dim=tensor_shape(decoder_tensors, "attention.encoder_att.weight", path)[0],
        embed_dim=tensor_shape(decoder_tensors, "embedding.weight", path)[1],
        decoder_dim=tensor_shape(decoder_tensors, "init_h.weight", path)[0],
        dropout=float(dropout.state.get("p", 0.5)) if dropout is not None else 0.5)
    return args


def check_tensors_fit(path, name, tensors, module):
    """Refuse tensors whose names or shapes differ from `module`'s, naming them (tutorial names)."""
    expected = module.state_dict()
    back = {new: old for old, new in DECODER_RENAMES.items()} if name == "decoder" else {}
    problems = [f"{name}.{tutorial_name(k, back)} {what}"
                for k, what in [(k, "missing") for k in expected.keys() - tensors.keys()]
                + [(k, "unexpected") for k in tensors.keys() - expected.keys()]
                + [(k, f"is {tuple(tensors[k].shape)}, expected {tuple(expected[k].shape)}")
                   for k in expected.keys() & tensors.keys() if tensors[k].shape != expected[k].shape]]
    if problems:
        problems.sort()
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise UserError(f"{path}: its {name} does not fit the tutorial's model with the sizes its other "
                        f"tensors and the word map give: {shown}")


def add_batches_tracked(tensors, module):
    """Add the batch counters PyTorch 0.4.0's BatchNorm2d did not keep (0.4.1 added them), at 0, as
    BatchNorm2d itself does when it loads a state dict that old; in place."""
    for name in module.state_dict():
        layer = name[:-len("num_batches_tracked")]
        if name.endswith(".num_batches_tracked") and name not in tensors and layer + "running_mean" in tensors:
            tensors[name] = torch.tensor(0, dtype=torch.long)


def set_fine_tuning_state(encoder, encoder_tensors):
    """Give `encoder` the tutorial's fine-tuning state, read from which pickled parameters had
    requires_grad: none (a frozen encoder), or blocks 2-4, what the tutorial's fine_tune() sets and
    what --fine-tune-encoder trains here. An encoder that trained other blocks (an edited tutorial)
    gets blocks 2-4 too, and a note saying so. Returns (whether fine-tuned, the note or None)."""
    trainable = {name for name, t in encoder_tensors.items() if t.requires_grad}
    encoder.set_fine_tuning(True)
    tuned = {name for name, p in encoder.named_parameters() if p.requires_grad}
    encoder.set_fine_tuning(bool(trainable))
    if not trainable or trainable == tuned:
        return bool(trainable), None
    return True, (f"its encoder trained {resnet_parts(trainable)} rather than {resnet_parts(tuned)} as the "
                  "tutorial's fine_tune() sets; the weights are converted as they are, and train.py --resume "
                  f"--fine-tune-encoder trains {resnet_parts(tuned)}")


def resnet_parts(names):
    """The torchvision names of the ResNet children that tensors `names` (resnet.<child>...) belong to."""
    children = ("conv1", "bn1", "relu", "maxpool") + RESNET_BLOCKS
    indices = sorted({int(name.split(".")[1]) for name in names if name.split(".")[1].isdigit()})
    return ", ".join(children[i] if i < len(children) else f"child {i}" for i in indices)


# ----------------------------------------------------------------------------------------------
# Optimisers


def mapped_adam_state(pickled, names_by_param, params):
    """A pickled tutorial Adam's state dict, re-indexed for `params` [(name, Parameter)] in this
    repo's order, and a note when some of them start afresh (or None); or None and why it does not map."""
    if pickled is None:
        return None, "the tutorial's checkpoint has no optimiser for it"
    is_adam = getattr(pickled, "pickled_name", None) == "torch.optim.adam.Adam"
    groups = pickled.state.get("param_groups") if is_adam else None
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        return None, "it is not one Adam parameter group"
    order = [name for name, _ in params]
    theirs = {names_by_param.get(id(p)) for p in groups[0].get("params", [])}
    if None in theirs or not theirs & set(order):
        return None, "its parameters are not the ones this code's optimiser updates"
    by_name = {names_by_param.get(id(p)): s for p, s in (pickled.state.get("state") or {}).items()}
    state = {i: dict(by_name[name]) for i, name in enumerate(order) if isinstance(by_name.get(name), dict)}
    if any(isinstance(v, torch.Tensor) and k != "step" and v.shape != params[i][1].shape
           for i, moments in state.items() for k, v in moments.items()):
        return None, "its moment estimates do not have the parameters' shapes"
    group = {k: v for k, v in groups[0].items() if k != "params"}
    fresh = sum(name not in theirs for name in order)  # an edited fine_tune() trained other tensors
    note = f"keeps its moment estimates but for {fresh} tensors it did not train, which start afresh" if fresh else None
    return {"state": state, "param_groups": [{**group, "params": list(range(len(order)))}]}, note


def convert_optimizer(pickled, names_by_param, params, lr):
    """(an Adam state dict for `params`, a note or None) from the tutorial's optimiser: its state, or a
    fresh Adam's at `lr` and why the tutorial's does not carry over."""
    saved, note = mapped_adam_state(pickled, names_by_param, params)  # why not, when saved is None
    optimizer = torch.optim.Adam([p for _, p in params], lr=lr)
    if saved is not None:
        try:
            optimizer.load_state_dict(saved)
            return optimizer.state_dict(), note
        except (ValueError, KeyError, TypeError) as exc:
            note = f"torch refused it ({exc})"
            optimizer = torch.optim.Adam([p for _, p in params], lr=lr)
    return optimizer.state_dict(), f"state restarts: {note}"


def optimizer_states(checkpoint, encoder, decoder, tutorial_names, args):
    """This repo's decoder and encoder optimiser states from the tutorial's; notes on what restarts."""
    notes = []
    states = {}
    for name, module, lr in (("decoder", decoder, args["decoder_lr"]), ("encoder", encoder, args["encoder_lr"])):
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not params:  # a frozen encoder has no optimiser, as in train.py
            states[name] = None
            continue
        states[name], note = convert_optimizer(checkpoint.get(f"{name}_optimizer"), tutorial_names[name], params, lr)
        if note:
            notes.append(f"the {name}'s optimiser {note}")
    return states, notes


# ----------------------------------------------------------------------------------------------
# The checkpoint


def convert_checkpoint(path, word_map, image_size):
    """A tutorial checkpoint -> (train.py checkpoint dict, notes on what did not carry over)."""
    checkpoint = read_tutorial_checkpoint(path)
    tensors = {"encoder": module_tensors(checkpoint["encoder"]), "decoder": module_tensors(checkpoint["decoder"])}
    args = model_args(checkpoint, tensors["decoder"], path)
    encoder, decoder = build_models(args, len(word_map), load_weights=False)
    add_batches_tracked(tensors["encoder"], encoder)
    args["fine_tune_encoder"], fine_tuning_note = set_fine_tuning_state(encoder, tensors["encoder"])
    ours = {"encoder": tensors["encoder"], "decoder": renamed(tensors["decoder"], DECODER_RENAMES)}
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        check_tensors_fit(path, name, ours[name], module)
        module.load_state_dict(ours[name])
    # The optimisers name parameters by object: the same pickled Parameters as in the modules.
    tutorial_names = {name: {id(t): our_name for t, our_name in zip(tensors[name].values(), ours[name])}
                      for name in ("encoder", "decoder")}
    optimizers, notes = optimizer_states(checkpoint, encoder, decoder, tutorial_names, args)
    if fine_tuning_note:
        notes.insert(0, fine_tuning_note)
    # Only numbers are kept from the rest: the checkpoint written must hold plain types alone.
    epoch, since, bleu4 = (checkpoint.get(k) if isinstance(checkpoint.get(k), (int, float)) else None
                           for k in ("epoch", "epochs_since_improvement", "bleu-4"))
    state = {
        "format_version": CHECKPOINT_VERSION, "encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
        "decoder_optimizer": optimizers["decoder"], "encoder_optimizer": optimizers["encoder"], "scaler": None,
        # The tutorial's epoch is the one it finished; here `epoch` is the next one to train. Its BLEU-4
        # came from teacher forcing, which the decoded BLEU-4 that picks best.pt here cannot be compared
        # with, so the best score and the patience counter start afresh (the first epoch sets them).
        "epoch": epoch + 1 if isinstance(epoch, int) else 0, "samples_done": 0, "best_bleu4": -1.0,
        "epochs_since_improvement": 0, "history": [],
        "args": args, "word_map": word_map, "image_size": image_size,
        "rng": {"torch": torch.Generator().manual_seed(args["seed"]).get_state(),
                "python": random.Random(args["seed"]).getstate()},
        "converted_from": {"checkpoint": str(Path(path).resolve()), "epoch": epoch,
                           "epochs_since_improvement": since, "teacher_forced_bleu4": bleu4},
    }
    return state, notes


def check_word_map(word_map, path):
    """Refuse a word map that is not {word: index} with the special tokens and distinct indices."""
    if not isinstance(word_map, dict) or not all(isinstance(i, int) for i in word_map.values()):
        raise UserError(f"{path}: not a word map {{word: index}}; pass the tutorial's WORDMAP_<base>.json")
    missing = [t for t in SPECIAL_TOKENS if t not in word_map]
    if missing or sorted(word_map.values()) != list(range(len(word_map))):
        raise UserError(f"{path}: a word map needs {', '.join(SPECIAL_TOKENS)} and the indices 0..{len(word_map) - 1} "
                        f"once each ({'missing ' + ', '.join(missing) if missing else 'they are not'}); "
                        "pass the tutorial's WORDMAP_<base>.json")


# ----------------------------------------------------------------------------------------------
# The packed data


TUTORIAL_FILES = ("WORDMAP_<base>.json, {TRAIN,VAL,TEST}_IMAGES_<base>.hdf5, {TRAIN,VAL,TEST}_CAPTIONS_<base>.json "
                  "and {TRAIN,VAL,TEST}_CAPLENS_<base>.json")
PASS_THE_FOLDER = "pass --tutorial-folder the output_folder the tutorial's create_input_files.py wrote them into"


def tutorial_base_name(folder, base_name):
    """The <base> of the tutorial's file names: given, or that of the folder's one WORDMAP_<base>.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder, so none of the tutorial's {TUTORIAL_FILES}; {PASS_THE_FOLDER}")
    if base_name:
        return base_name
    found = sorted(p.name[len("WORDMAP_"):-len(".json")] for p in folder.glob("WORDMAP_*.json"))
    if len(found) != 1:
        raise UserError(f"{folder}: {'no' if not found else len(found)} WORDMAP_<base>.json files"
                        f"{' (' + ', '.join(found) + ')' if found else ''} of the tutorial's {TUTORIAL_FILES}; "
                        f"{PASS_THE_FOLDER}, and --base-name to say which <base> if there are several")
    return found[0]


def missing_tutorial_files(folder, base):
    """Refuse a folder without all of the tutorial's files for `base`, naming those not there."""
    names = [f"WORDMAP_{base}.json"] + [tutorial_file(folder, split, kind, base).name
                                        for split in SPLITS for kind in ("IMAGES", "CAPTIONS", "CAPLENS")]
    missing = [name for name in names if not (Path(folder) / name).is_file()]
    if missing:
        raise UserError(f"{folder}: no {', '.join(missing)} (looked for {', '.join(names)}); {PASS_THE_FOLDER}, "
                        "and --base-name the <base> of its WORDMAP_<base>.json")


def tutorial_file(folder, split, kind, base):
    """The tutorial's file of `kind` (IMAGES, CAPTIONS, CAPLENS) for a split of ours."""
    return Path(folder) / f"{split.upper()}_{kind}_{base}.{'hdf5' if kind == 'IMAGES' else 'json'}"


def read_split_captions(folder, split, base, num_images, per_image, word_map):
    """The tutorial's encoded captions (N*C, L) and lengths (N*C,) of a split as int32 arrays, checked."""
    captions_path = tutorial_file(folder, split, "CAPTIONS", base)
    lengths_path = tutorial_file(folder, split, "CAPLENS", base)
    try:
        captions = np.asarray(read_json(captions_path, "the tutorial's encoded captions"), dtype=np.int32)
        lengths = np.asarray(read_json(lengths_path, "the tutorial's caption lengths"), dtype=np.int32)
    except (ValueError, TypeError):
        raise UserError(f"{captions_path} or {lengths_path}: not lists of equally long rows of integers; "
                        "write them again with the tutorial's create_input_files.py") from None
    rows = num_images * per_image
    if captions.ndim != 2 or captions.shape[0] != rows or lengths.shape != (rows,):
        raise UserError(f"{captions_path}: {captions.shape[0] if captions.ndim else 0} captions and "
                        f"{lengths.size} lengths for {num_images} images x {per_image} captions; "
                        "the files do not belong together: convert a folder the tutorial wrote in one run")
    index = np.arange(rows)
    ok = ((lengths >= 2) & (lengths <= captions.shape[1])).all() and (captions >= 0).all() \
        and (captions < len(word_map)).all() and (captions[:, 0] == word_map["<start>"]).all() \
        and (captions[index, np.clip(lengths, 1, captions.shape[1]) - 1] == word_map["<end>"]).all()
    if not ok:
        raise UserError(f"{captions_path}: rows that are not <start> words <end> <pad>... of the word map's "
                        f"indices with the lengths in {lengths_path}; convert a folder the tutorial wrote in one run")
    return captions, lengths


def copy_images(source, target, chunk_images, progress):
    """Copy images (N, 3, S, S) uint8 from one HDF5 dataset to another, `chunk_images` at a time
    through one reused buffer, so that memory holds one chunk whatever the size of the split."""
    num_images = source.shape[0]
    buffer = np.empty((min(chunk_images, max(num_images, 1)), *source.shape[1:]), dtype=np.uint8)  # (n, 3, S, S)
    for start in range(0, num_images, chunk_images):
        count = min(chunk_images, num_images - start)
        source.read_direct(buffer, np.s_[start:start + count], np.s_[:count])
        target.write_direct(buffer, np.s_[:count], np.s_[start:start + count])
        progress.update(count)


def image_meta(split, base, captions, lengths, per_image, word_map):
    """{split}_meta.json's entries: no source file (the tutorial keeps none), every caption's words
    as text and, special tokens removed, as the references eval.py scores against."""
    rev_word_map = {i: w for w, i in word_map.items()}
    entries = []
    for image in range(len(captions) // per_image):
        rows = range(image * per_image, (image + 1) * per_image)
        words = [decode_tokens(strip_special(captions[r, :lengths[r]].tolist(), word_map), rev_word_map)
                 for r in rows]
        entries.append({"file": None, "name": f"{split.upper()}_IMAGES_{base}.hdf5#{image}", "image_id": image,
                        "objects": None, "captions": [" ".join(w) for w in words], "references": words})
    return entries


def convert_split(folder, base, split, out, word_map, chunk_images, progress):
    """Write one split into `out` under a temporary name, removed again if anything fails; returns
    (temporary path, image size, captions per image, max_len, meta entries)."""
    source_path = tutorial_file(folder, split, "IMAGES", base)
    partial = out / f".{split}.h5.partial"
    try:
        with h5py.File(source_path, "r") as source:
            images = source.get("images")
            if images is None or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] \
                    or images.dtype != np.uint8:
                raise UserError(f"{source_path}: no 'images' dataset (N, 3, S, S) of uint8, as the tutorial writes")
            per_image = int(source.attrs.get("captions_per_image", 0))
            if per_image < 1:
                raise UserError(f"{source_path}: no captions_per_image attribute, as the tutorial writes")
            captions, lengths = read_split_captions(folder, split, base, images.shape[0], per_image, word_map)
            size = images.shape[2]
            with h5py.File(partial, "w") as target:
                # One chunk per image, as create_input_files.py writes: training reads images one at a time.
                target.create_dataset("images", shape=images.shape, dtype="uint8", chunks=(1, 3, size, size))
                copy_images(images, target["images"], chunk_images, progress)
                target.create_dataset("captions", data=captions)
                target.create_dataset("lengths", data=lengths)
                target.attrs["captions_per_image"] = per_image
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # h5py: a damaged file, a full disk
            raise UserError(f"{source_path}: cannot convert it ({str(exc).splitlines()[0]}); check the file "
                            "and the space left in the output folder") from None
        raise
    meta = image_meta(split, base, captions, lengths, per_image, word_map)
    return partial, size, per_image, captions.shape[1] - 2, meta


def count_images(folder, base):
    """{split: number of images} of the tutorial's three image files; UserError for a missing one."""
    counts = {}
    for split in SPLITS:
        path = tutorial_file(folder, split, "IMAGES", base)
        try:
            with h5py.File(path, "r") as f:
                counts[split] = f["images"].shape[0] if "images" in f else 0
        except OSError as exc:
            raise UserError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]}); write it again with "
                            "the tutorial's create_input_files.py") from None
    return counts


def convert_data(folder, out, base_name=None, chunk_images=256):
    """The tutorial's packed folder -> this repo's packed layout in `out`; returns the manifest.

    As create_input_files.py does, the manifest goes last and the split files are renamed into place
    only once all three are written, so an interrupted run leaves no manifest and no half-written file.
    """
    folder, out = Path(folder), Path(out)
    base = tutorial_base_name(folder, base_name)
    missing_tutorial_files(folder, base)
    word_map_path = folder / f"WORDMAP_{base}.json"
    word_map = read_json(word_map_path, "the tutorial's word map")
    check_word_map(word_map, word_map_path)
    counts = count_images(folder, base)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder without a manifest is an unfinished run
    done = {}
    try:
        with tqdm(total=sum(counts.values()), desc="copying images", unit="img", file=sys.stderr) as progress:
            for split in SPLITS:
                done[split] = convert_split(folder, base, split, out, word_map, chunk_images, progress)
        # The JSON files before the split files take their names: renaming needs no space.
        for split, (*_, meta) in done.items():
            write_meta(out, split, meta)
        write_json(out / WORD_MAP, word_map)
    except BaseException as exc:
        for partial, *_ in done.values():
            partial.unlink(missing_ok=True)
        full = disk_full(exc)
        if full is not None:
            raise UserError(f"{out}: the disk filled up while converting ({full.strerror}); free some space "
                            "and run again") from None
        raise
    for split, (partial, *_) in done.items():
        partial.replace(split_file(out, split))
    manifest = data_manifest(folder, base, word_map, done)
    write_json(out / MANIFEST, manifest)
    return manifest


def data_manifest(folder, base, word_map, done):
    """The keys create_input_files.py writes, and where the data was converted from."""
    _, size, per_image, max_len, _ = done["train"]
    match = re.fullmatch(r"(.+)_(\d+)_cap_per_img_(\d+)_min_word_freq", base)
    return {
        "format_version": 1, "dataset": match.group(1) if match else base, "image_size": size,
        "captions_per_image": per_image, "max_len": max_len,
        "min_word_freq": int(match.group(3)) if match else None, "vocab_size": len(word_map),
        "images": {split: len(meta) for split, (*_, meta) in done.items()}, "has_objects": False,
        "dropped": {"bad_images": 0}, "bad_images": [],
        "converted_from": {"format": "a-PyTorch-Tutorial-to-Image-Captioning create_input_files.py",
                           "folder": str(folder.resolve()), "base_name": base},
    }


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    """Command-line flags of the two commands."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="convert the tutorial's packed folder")
    data.add_argument("--tutorial-folder", type=Path, required=True,
                      help="the folder the tutorial's create_input_files.py wrote (its output_folder)")
    data.add_argument("--base-name", default=None,
                      help="the <base> of its file names, e.g. coco_5_cap_per_img_5_min_word_freq "
                           "(default: that of the folder's only WORDMAP_<base>.json)")
    data.add_argument("--output-folder", type=Path, required=True,
                      help="where the packed files go, as create_input_files.py's --output-folder")
    data.add_argument("--chunk-images", type=int, default=256,
                      help="images copied at a time; memory holds one chunk (default 256, 50 MB at 256x256)")
    ckpt = commands.add_parser("checkpoint", help="convert a tutorial checkpoint")
    ckpt.add_argument("--checkpoint", type=Path, required=True,
                      help="a checkpoint the tutorial's train.py wrote (checkpoint_<base>.pth.tar or BEST_...)")
    ckpt.add_argument("--word-map", type=Path, required=True,
                      help="the word map it was trained with: the tutorial's WORDMAP_<base>.json, or "
                           "word_map.json of the folder `data` converted")
    ckpt.add_argument("--output", type=Path, required=True,
                      help="the checkpoint to write, for eval.py, caption.py and train.py --resume")
    ckpt.add_argument("--image-size", type=int, default=256,
                      help="side of the images the model was trained on (default 256, the tutorial's)")
    args = parser.parse_args(argv)
    if args.command == "data" and args.chunk_images < 1:
        parser.error("--chunk-images must be at least 1")
    return args


def main(argv=None):
    """Convert data or a checkpoint; returns the manifest or the checkpoint dict written."""
    args = parse_args(argv)
    if args.command == "data":
        manifest = convert_data(args.tutorial_folder, args.output_folder, args.base_name, args.chunk_images)
        print(f"converted {manifest['images']} images into {args.output_folder}, "
              f"vocabulary {manifest['vocab_size']} words")
        return manifest
    word_map = read_json(args.word_map, "the word map the model was trained with: the tutorial's "
                         "WORDMAP_<base>.json, downloaded with its released model or written by its "
                         "create_input_files.py; pass its path to --word-map")
    check_word_map(word_map, args.word_map)
    state, notes = convert_checkpoint(args.checkpoint, word_map, args.image_size)
    save_checkpoint(args.output, state)
    tuned = "fine-tuned encoder" if state["args"]["fine_tune_encoder"] else "frozen encoder"
    print(f"wrote {args.output}: {state['args']['encoder_arch']} {tuned}, next epoch {state['epoch']}")
    for note in notes:
        print(f"note: {note}")
    return state


if __name__ == "__main__":
    run_main(lambda: main(), "convert_tutorial.py")
