r"""The tutorial's packing method, as bench.py's baseline for create_input_files.py.

    python bench_tutorial_pack.py --karpathy-json data/caption_datasets/dataset_coco.json \
        --image-folder data/coco --output-folder runs/tutorial_packed

sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning packs in utils.create_input_files: one process
reads every image whole (scipy.misc.imread), resizes it to 256x256 with scipy.misc.imresize's
default, bilinear, and writes it into the split's HDF5 dataset as soon as it is read; captions and
their lengths go to JSON files. This is that function, step for step, with the two scipy.misc
calls (removed from SciPy in 2019) written as what they did with Pillow. Its imports are the
tutorial utils.py's (torch included, which packing never uses), so that timing this file as a whole
process counts the start-up a tutorial user waits for. Not used by training: bench.py only.
"""

import argparse
import json
import os
from collections import Counter
from random import choice, sample, seed

import h5py
import numpy as np
import torch  # noqa: F401  (the tutorial's utils.py imports it; packing does not use it)
from PIL import Image
from tqdm import tqdm


def imread(path):
    """scipy.misc.imread: the whole file decoded by Pillow, as an array (H, W, 3) or (H, W)."""
    with Image.open(path) as image:
        return np.array(image)


def imresize(pixels, size):
    """scipy.misc.imresize(pixels, size): back to a Pillow image, bilinear resize, back to an array."""
    return np.array(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def read_karpathy(karpathy_json_path, image_folder, max_len):
    """The tutorial's first loop: per split, image paths and their captions of at most max_len words,
    and the word counts of every caption."""
    with open(karpathy_json_path) as j:
        data = json.load(j)
    splits = {"train": ([], []), "val": ([], []), "test": ([], [])}
    word_freq = Counter()
    for img in data["images"]:
        captions = []
        for c in img["sentences"]:
            word_freq.update(c["tokens"])
            if len(c["tokens"]) <= max_len:
                captions.append(c["tokens"])
        if len(captions) == 0:
            continue
        path = os.path.join(image_folder, img["filepath"], img["filename"])
        paths, caps = splits[{"restval": "train"}.get(img["split"], img["split"])]
        paths.append(path)
        caps.append(captions)
    return splits, word_freq


def create_input_files(karpathy_json_path, image_folder, captions_per_image, min_word_freq, output_folder,
                       max_len=50, dataset="coco"):
    """The tutorial's utils.create_input_files for a Karpathy-format split file."""
    splits, word_freq = read_karpathy(karpathy_json_path, image_folder, max_len)

    words = [w for w in word_freq.keys() if word_freq[w] > min_word_freq]
    word_map = {k: v + 1 for v, k in enumerate(words)}
    word_map["<unk>"] = len(word_map) + 1
    word_map["<start>"] = len(word_map) + 1
    word_map["<end>"] = len(word_map) + 1
    word_map["<pad>"] = 0
    base_filename = f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"
    with open(os.path.join(output_folder, "WORDMAP_" + base_filename + ".json"), "w") as j:
        json.dump(word_map, j)

    seed(123)
    for split, (impaths, imcaps) in splits.items():
        with h5py.File(os.path.join(output_folder, split.upper() + "_IMAGES_" + base_filename + ".hdf5"), "a") as h:
            h.attrs["captions_per_image"] = captions_per_image
            images = h.create_dataset("images", (len(impaths), 3, 256, 256), dtype="uint8")
            enc_captions, caplens = [], []
            for i, path in enumerate(tqdm(impaths)):
                if len(imcaps[i]) < captions_per_image:
                    captions = imcaps[i] + [choice(imcaps[i]) for _ in range(captions_per_image - len(imcaps[i]))]
                else:
                    captions = sample(imcaps[i], k=captions_per_image)
                img = imread(impaths[i])
                if len(img.shape) == 2:
                    img = img[:, :, np.newaxis]
                    img = np.concatenate([img, img, img], axis=2)
                img = imresize(img, (256, 256))
                img = img.transpose(2, 0, 1)
                assert img.shape == (3, 256, 256)
                assert np.max(img) <= 255
                images[i] = img  # written as soon as it is read
                for c in captions:
                    enc_captions.append([word_map["<start>"]] + [word_map.get(word, word_map["<unk>"]) for word in c]
                                        + [word_map["<end>"]] + [word_map["<pad>"]] * (max_len - len(c)))
                    caplens.append(len(c) + 2)
            with open(os.path.join(output_folder, split.upper() + "_CAPTIONS_" + base_filename + ".json"), "w") as j:
                json.dump(enc_captions, j)
            with open(os.path.join(output_folder, split.upper() + "_CAPLENS_" + base_filename + ".json"), "w") as j:
                json.dump(caplens, j)


def main(argv=None):
    """Pack as the tutorial does (its create_input_files.py has the arguments written in)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--karpathy-json", required=True, help="Karpathy-format split file")
    parser.add_argument("--image-folder", required=True, help="folder the images' filepath/filename are under")
    parser.add_argument("--output-folder", required=True, help="where the packed files go (must exist)")
    parser.add_argument("--captions-per-image", type=int, default=5, help="captions kept per image (default 5)")
    parser.add_argument("--min-word-freq", type=int, default=5,
                        help="words seen this many times or fewer become <unk> (default 5, as the tutorial)")
    args = parser.parse_args(argv)
    create_input_files(args.karpathy_json, args.image_folder, args.captions_per_image, args.min_word_freq,
                       args.output_folder)


if __name__ == "__main__":
    main()
