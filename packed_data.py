"""The packed data folder that create_input_files.py writes: its file names, manifest and word map.

    from packed_data import SPLITS, read_word_map, split_file
    word_map = read_word_map("runs/demo/data")          # refuses a folder whose packing did not finish
    split_file("runs/demo/data", "train")               # runs/demo/data/train.h5

create_input_files.py writes this layout and datasets.py reads it; neither this module nor the
packer imports torch, so packing starts without loading it (datasets.py re-exports these names).
"""

import json
from pathlib import Path

from utils import UserError, atomic_write, read_json

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


def write_meta(data_folder, split, entries):
    """Write meta_file(data_folder, split): {"images": entries}, one image's entry a line.

    A line an image keeps the file easy to read and grep, and lets json.dumps use its C encoder,
    which indented JSON cannot: about a third of the time (docs/packing-speed.md).
    """
    lines = ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in entries)
    atomic_write(meta_file(data_folder, split), lambda f: f.write(f'{{"images": [\n{lines}\n]}}\n'))


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
