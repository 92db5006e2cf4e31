"""The PyTorch dataset over the packed data written by create_input_files.py (its layout: packed_data.py).

    from datasets import CaptionDataset
    train = CaptionDataset("runs/demo/data", "train")   # one item per caption
    grouped = CaptionDataset("runs/demo/data", "train", captions_per_item=5)  # an image and 5 of its captions
    test = CaptionDataset("runs/demo/data", "test")     # one item per image, all its captions
"""

import h5py
import torch
from torch.utils.data import Dataset

# The layout is defined beside the packer, which must not import torch; these names stay importable from here.
from packed_data import (MANIFEST, SPECIAL_TOKENS, SPLITS, WORD_MAP, decode_tokens, meta_file,  # noqa: F401
                         read_manifest, read_word_map, reference_tokens, split_file, strip_special)
from utils import UserError, normalize_images

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
