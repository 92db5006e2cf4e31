"""The packed data written by create_input_files.py: its file layout, word map, and PyTorch dataset.

    from datasets import CaptionDataset
    train = CaptionDataset("runs/demo/data", "train")   # one item per caption
    grouped = CaptionDataset("runs/demo/data", "train", captions_per_item=5)  # an image and 5 of its captions
    test = CaptionDataset("runs/demo/data", "test")     # one item per image, all its captions
"""

from pathlib import Path

import h5py
import torch
from torch.utils.data import Dataset

from utils import UserError, normalize_images, read_json

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
# The dataset


class CaptionDataset(Dataset):
    """Images and captions of one packed split.

    Training iterates over captions, as the paper and the tutorial do: item i is caption i with its
    image. With `captions_per_item` K > 1 it iterates over groups of K captions of one image instead
    (item i: captions i*K to i*K + K - 1, all of image i*K // C), so that a batch of them runs the
    encoder once per image, as self-critical.pytorch's `seq_per_img` does; an epoch still holds
    every caption once. Evaluation iterates over images, each with all its reference captions, so
    that one encoder pass serves the teacher-forced loss on every reference and the decoded caption.

    Items:
        per caption: image (3, S, S) float normalised, caption (L,) long, length () long.
        per group of K captions: image (3, S, S) float, captions (K, L) long, lengths (K,) long.
        per image: image (3, S, S) float, captions (C, L) long, lengths (C,) long, index () long.

    The HDF5 file is opened lazily, in whichever process reads first, so DataLoader workers each
    get their own handle (h5py handles do not survive being copied into another process).
    """

    def __init__(self, data_folder, split, per_image=None, captions_per_item=1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.manifest = read_manifest(data_folder)
        self.path = split_file(data_folder, split)
        self.per_image = split != "train" if per_image is None else per_image
        try:
            with h5py.File(self.path, "r") as f:
                self.num_images = f["images"].shape[0]
                self.captions_per_image = int(f.attrs["captions_per_image"])
                # Captions are small (COCO: ~120 MB); reading them once beats an HDF5 call per item.
                self.captions = torch.from_numpy(f["captions"][:].astype("int64"))  # (N*C, L)
                self.lengths = torch.from_numpy(f["lengths"][:].astype("int64"))  # (N*C,)
        except (OSError, KeyError) as exc:
            raise UserError(f"{self.path}: cannot read the packed {split} split ({exc}); "
                            "run create_input_files.py again") from None
        if self.captions_per_image % captions_per_item:
            raise UserError(f"{self.path}: its images have {self.captions_per_image} captions each, which do not "
                            f"split into groups of {captions_per_item}; pass a --captions-per-image-per-step that "
                            f"divides {self.captions_per_image}")
        self.captions_per_item = captions_per_item
        self._file = None

    def __len__(self):
        return self.num_images if self.per_image else len(self.captions) // self.captions_per_item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None  # each worker opens its own handle
        return state

    def _image(self, index):
        """Image `index` as a normalised float tensor (3, S, S)."""
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return normalize_images(torch.from_numpy(self._file["images"][index]))

    def __getitem__(self, i):
        if not self.per_image and self.captions_per_item == 1:
            return self._image(i // self.captions_per_image), self.captions[i], self.lengths[i]
        if not self.per_image:
            rows = slice(i * self.captions_per_item, (i + 1) * self.captions_per_item)
            return self._image(rows.start // self.captions_per_image), self.captions[rows], self.lengths[rows]
        rows = slice(i * self.captions_per_image, (i + 1) * self.captions_per_image)
        return self._image(i), self.captions[rows], self.lengths[rows], torch.tensor(i)
