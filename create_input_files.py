r"""Pack images and tokenised captions into HDF5 + JSON for train.py, eval.py and datasets.py.

    python create_input_files.py --dataset coco --karpathy-json data/caption_datasets/dataset_coco.json \
        --image-folder data/coco --output-folder data/coco_packed
    python create_input_files.py --dataset coco --coco-annotations \
        data/coco/annotations/captions_train2014.json data/coco/annotations/captions_val2014.json \
        --image-folder data/coco --output-folder data/coco_packed
    python create_input_files.py --dataset shapes --karpathy-json data/shapes/dataset_shapes.json \
        --image-folder data/shapes --output-folder data/shapes_packed --image-size 64

Output folder (manifest.json is written last, so a folder without it is an unfinished run):
    word_map.json           {word: index}, <pad> = 0, then words, <unk>, <start>, <end>
    {split}.h5              images (N, 3, S, S) uint8; captions (N*C, max_len+2) int32
                            (<start> words <end> <pad>...); lengths (N*C,) int32 with <start>/<end>
    {split}_meta.json       one line per image: source file (absolute path), name in the dataset, image id,
                            every caption as given ("captions") and tokenised ("references": what
                            eval.py scores against, all of them, each once), and objects with boxes
                            (shapes set)
    manifest.json           what was packed, how, and the counts of what was dropped
"""

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from packed_data import MANIFEST, SPLITS, WORD_MAP, split_file, write_meta
from utils import UserError, disk_full, ignore_pillow_warnings, load_image, read_json, run_main, write_json

# Words are runs of letters or digits in any script, with inner apostrophes ("don't").
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
# Chinese and Japanese are written without spaces, so each ideograph or kana is a word of its own
# (as BERT's tokenizer does); otherwise "一只猫" would be one word, seen once.
_CJK = "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]"
_HAS_CJK = re.compile(_CJK)
_LETTERS = f"(?:(?!{_CJK})[^\\W_])+"
_CJK_OR_WORD = re.compile(f"{_CJK}|{_LETTERS}(?:['\u2019]{_LETTERS})*")


def tokenize(text):
    """Lower-cased words of a caption; punctuation is dropped. Needs no downloaded NLTK data."""
    words = _WORD.findall(text.lower())
    if text.isascii() or not _HAS_CJK.search(text):
        return words
    return [part for word in words
            for part in (_CJK_OR_WORD.findall(word) if _HAS_CJK.search(word) else [word])]


def usable_cpus():
    """The CPUs this process may run on: those taskset or a cluster job gave it, not all the machine's
    (more decoding threads than that only take turns)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_argument_group("source")
    src.add_argument("--dataset", choices=("coco", "flickr8k", "flickr30k", "shapes"), default="coco",
                     help="dataset name, recorded in the manifest (default: coco)")
    src.add_argument("--karpathy-json", type=Path, default=None,
                     help="Karpathy-format split file (dataset_coco.json, ..., dataset_shapes.json)")
    src.add_argument("--coco-annotations", type=Path, nargs="+", default=None,
                     help="instead of --karpathy-json: official COCO caption files "
                          "(captions_train2014.json captions_val2014.json), read with pycocotools")
    src.add_argument("--image-folder", type=Path, required=True,
                     help="folder the images' paths are relative to (Karpathy's filepath/filename, "
                          "or <folder>/train2014/<file_name> for --coco-annotations)")
    src.add_argument("--val-size", type=int, default=5000,
                     help="--coco-annotations only: val2014 images held out for validation (default 5000)")
    src.add_argument("--test-size", type=int, default=5000,
                     help="--coco-annotations only: val2014 images held out for testing (default 5000)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-folder", type=Path, required=True, help="where the packed files go")
    out.add_argument("--image-size", type=int, default=256, help="side of the square images (default 256)")
    out.add_argument("--captions-per-image", type=int, default=5,
                     help="captions kept per image; images with fewer repeat some (default 5)")
    out.add_argument("--min-word-freq", type=int, default=5,
                     help="words seen fewer times in training captions become <unk> (default 5)")
    out.add_argument("--max-len", type=int, default=50,
                     help="captions with more words are dropped (default 50)")
    sysg = parser.add_argument_group("system")
    sysg.add_argument("--workers", type=int, default=min(8, usable_cpus()),
                      help="threads decoding images, 0 for none (default: the CPUs this process may use, "
                           "at most 8)")
    sysg.add_argument("--seed", type=int, default=0, help="seed for choosing and repeating captions")
    sysg.add_argument("--skip-bad-images", action="store_true",
                      help="skip images that are missing or cannot be decoded (with their captions) "
                           "and list them at the end, instead of stopping at the first one")
    args = parser.parse_args(argv)
    if (args.karpathy_json is None) == (args.coco_annotations is None):
        parser.error("give exactly one of --karpathy-json and --coco-annotations")
    for name in ("image_size", "captions_per_image", "max_len", "val_size", "test_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        parser.error("--workers must be 0 (decode in the main thread) or more")
    return args


def read_karpathy(path, image_folder):
    """Karpathy-format JSON -> list of image records {split, path, name, captions, image_id, objects, size}.

    'restval' images go to training, as in the tutorial.
    """
    data = read_json(path, "a Karpathy-format split file with an 'images' list")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: no 'images' list; expected a Karpathy-format split file")
    records = []
    for i, img in enumerate(data["images"]):
        try:
            split = {"restval": "train"}.get(img["split"], img["split"])
            captions = [" ".join(s["tokens"]) if "tokens" in s else s["raw"] for s in img["sentences"]]
            records.append({
                "split": split,
                "path": image_folder / img.get("filepath", "") / img["filename"],
                "name": str(Path(img.get("filepath", "")) / img["filename"]),  # the same wherever the data is
                "captions": [c if isinstance(c, str) else "" for c in captions],
                "image_id": img.get("cocoid", img.get("imgid", i)),
                "objects": img.get("objects"),
                "size": (img.get("width"), img.get("height")),
            })
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: image entry {i} lacks {exc}; expected Karpathy's fields "
                            "filename, split and sentences with tokens or raw") from None
        if split not in SPLITS:
            raise UserError(f"{path}: image entry {i} has split {img['split']!r}, "
                            "expected train, restval, val or test")
    return records


def read_coco_annotations(paths, image_folder, val_size, test_size, seed):
    """Official COCO caption files -> image records. train2014 trains; val2014 gives `val_size`
    validation and `test_size` test images, chosen by a seeded shuffle, and its rest trains."""
    from pycocotools.coco import COCO

    records = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such COCO annotation file")
        subset = "val2014" if "val" in Path(path).name else "train2014"
        coco = COCO(str(path))
        image_ids = sorted(coco.getImgIds())
        if subset == "val2014":
            check_held_out_sizes(path, len(image_ids), val_size, test_size)
            random.Random(seed).shuffle(image_ids)
        for rank, image_id in enumerate(image_ids):
            info = coco.loadImgs(image_id)[0]
            split = "train"
            if subset == "val2014":
                split = "val" if rank < val_size else "test" if rank < val_size + test_size else "train"
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            records.append({"split": split, "path": image_folder / subset / info["file_name"],
                            "name": f"{subset}/{info['file_name']}",
                            "captions": captions, "image_id": image_id, "objects": None,
                            "size": (info.get("width"), info.get("height"))})
    return records


def check_held_out_sizes(path, available, val_size, test_size):
    """Refuse --val-size/--test-size that val2014 cannot fill (an empty or short split is found
    only much later, by train.py or eval.py)."""
    if val_size + test_size > available:
        raise UserError(f"{path}: holds {available} images, fewer than --val-size {val_size} plus "
                        f"--test-size {test_size}; pass smaller sizes (their sum at most {available})")


def _load_or_error(index, path, size):
    """(index, pixels or None, error message or None) for one image."""
    try:
        return index, load_image(path, size), None
    except UserError as exc:
        return index, None, str(exc)


def _load_batch(first, paths, size):
    """_load_or_error for consecutive images, the first numbered `first`: one task for a decoding thread."""
    return [_load_or_error(first + k, path, size) for k, path in enumerate(paths)]


# Images a decoding thread takes at a time. Each task costs the thread that hands them out a
# submit and a result, holding the GIL the decoding threads also need (docs/packing-speed.md).
DECODE_BATCH = 8


def decode_images(records, size, workers, batch=DECODE_BATCH):
    """Yield (index, pixels or None, error or None) in input order, decoding in `workers` threads.

    Threads, not processes: libjpeg-turbo (simplejpeg), Pillow's decoders and its resize release
    the GIL, so the threads decode on every core, and the pixels need no copying between processes
    (side by side on 2 cores, 2 threads packed 10% more images/s than 2 processes sharing memory).
    Each thread takes `batch` images at a time, and at most two batches per thread are in flight,
    so memory stays flat however many images there are.
    """
    if workers == 0:
        yield from (_load_or_error(i, r["path"], size) for i, r in enumerate(records))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        in_flight = deque()
        for first in range(0, len(records), batch):
            paths = [r["path"] for r in records[first:first + batch]]
            in_flight.append(pool.submit(_load_batch, first, paths, size))
            if len(in_flight) >= 2 * workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def encode_caption(tokens, word_map, max_len):
    """Words -> `<start> ids <end> <pad>...` of length max_len + 2, and its length."""
    unk = word_map["<unk>"]
    ids = [word_map["<start>"]] + [word_map.get(w, unk) for w in tokens] + [word_map["<end>"]]
    return ids + [word_map["<pad>"]] * (max_len + 2 - len(ids)), len(ids)


def build_word_map(train_captions, min_word_freq):
    """{word: index}: <pad> 0, then words seen at least `min_word_freq` times, <unk>, <start>, <end>."""
    freq = Counter(w for caps in train_captions for c in caps for w in c)
    words = sorted(w for w, n in freq.items() if n >= min_word_freq)  # sorted: the same map every run
    word_map = {"<pad>": 0}
    for w in words + ["<unk>", "<start>", "<end>"]:
        word_map[w] = len(word_map)
    return word_map


def normalised_objects(record, image_path):
    """The record's objects with boxes scaled to [0, 1] of the image, or None."""
    if not record["objects"]:
        return None
    width, height = record["size"]
    if not width or not height:
        from PIL import Image

        with Image.open(image_path) as im:
            width, height = im.size
    return [{**o, "bbox": [o["bbox"][0] / width, o["bbox"][1] / height,
                           o["bbox"][2] / width, o["bbox"][3] / height]} for o in record["objects"]]


class ImageChunkWriter:
    """Appends images to an HDF5 dataset (N, 3, S, S) stored one image a chunk, each as its chunk's
    bytes (h5py's write_direct_chunk).

    A direct chunk write skips the chunk cache and HDF5's copy of the image into it, and the
    dataset is sized once, for every image that may come, instead of grown as they do; finish()
    cuts it to the images written. The chunks are those an ordinary write would store; what it
    saves is measured in docs/packing-speed.md.
    """

    def __init__(self, dataset, capacity):
        unfiltered = dataset.id.get_create_plist().get_nfilters() == 0  # chunks stored as given
        if dataset.chunks != (1, *dataset.shape[1:]) or not unfiltered or dataset.dtype != np.uint8:
            raise ValueError("ImageChunkWriter needs a uint8 dataset, unfiltered, one image a chunk")
        self.dataset, self.count = dataset, 0
        dataset.resize(capacity, axis=0)

    def add(self, pixels):
        """pixels: (3, S, S) uint8, stored as image number `count`."""
        self.dataset.id.write_direct_chunk((self.count, 0, 0, 0), np.ascontiguousarray(pixels, dtype=np.uint8))
        self.count += 1

    def finish(self):
        """Cut the dataset to the images written (fewer than its capacity when some were skipped)."""
        self.dataset.resize(self.count, axis=0)


def tokenize_records(records, max_len, dropped):
    """Give each record its captions' tokens: "tokens" for training, without empty captions and those
    of more than `max_len` words, and "references" for scoring, without empty ones only. Returns the
    records left with at least one caption to train on. Counts what was dropped in `dropped`."""
    for record in records:
        tokenized = []
        record["references"] = []  # every caption with words, long ones too: what eval.py scores against
        for caption in record["captions"]:
            tokens = tokenize(caption)
            if not tokens:
                dropped["empty_captions"] += 1
                continue
            record["references"].append(tokens)
            if len(tokens) > max_len:
                dropped["long_captions"] += 1
            else:
                tokenized.append(tokens)
        record["tokens"] = tokenized
    usable = [r for r in records if r["tokens"]]
    dropped["images_without_captions"] = len(records) - len(usable)
    return usable


def error_reason(error, path):
    """load_image's message without the path it starts with: "cannot decode image (...)"."""
    prefix = f"{path}: "
    return error[len(prefix):] if error.startswith(prefix) else error


def packed_bytes(num_images, args):
    """The bytes of the split files' arrays for `num_images` images: pixels, captions and lengths."""
    caption_bytes = 4 * (args.max_len + 2 + 1)  # int32 ids with <start> and <end>, and a length
    return num_images * (3 * args.image_size ** 2 + args.captions_per_image * caption_bytes)


def check_free_space(folder, needed):
    """Refuse to start when `folder`'s disk has less than `needed` bytes free, rather than stop where the
    disk fills: COCO's split files take 24 GB at 256 pixels, and a laptop's disk may fill deep into the run.
    The arrays alone are a floor (HDF5's own records and the JSON files add a little), so a run this
    lets through may still fill the disk; main() then says so in one line."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"{folder}: the packed images and captions alone take {needed / 1e9:.2f} GB and "
                        f"this disk has {free / 1e9:.2f} GB free; free some space or pass an "
                        "--output-folder on a disk with room")


def write_images(records, split_files, args, kept, bad_images):
    """Decode every record's image into its split's file; append the records written to kept[split]
    and the paths of images that could not be read to `bad_images` (with --skip-bad-images)."""
    capacity = Counter(record["split"] for record in records)
    writers = {split: ImageChunkWriter(split_files[split]["images"], capacity[split]) for split in SPLITS}
    progress = tqdm(decode_images(records, args.image_size, args.workers), total=len(records),
                    desc="packing images", unit="img", file=sys.stderr)
    for index, pixels, error in progress:
        record = records[index]
        if error is not None:
            if not args.skip_bad_images:
                raise UserError(f"{error}; fix or remove it, or pass --skip-bad-images")
            bad_images.append({"file": str(record["path"]), "reason": error_reason(error, record["path"])})
            continue
        writers[record["split"]].add(pixels)
        # Now, while the decoding threads work, rather than after the last image with one core idle.
        record["meta"] = image_meta(record)
        kept[record["split"]].append(record)
    for writer in writers.values():
        writer.finish()


def pack(args):
    """The whole packing run; returns the manifest it wrote."""
    out = args.output_folder
    out.mkdir(parents=True, exist_ok=True)
    # The manifest marks a finished run: remove it first so a run killed part way is never
    # mistaken for a finished one, whatever an earlier run left here.
    (out / MANIFEST).unlink(missing_ok=True)

    if args.karpathy_json is not None:
        records = read_karpathy(args.karpathy_json, args.image_folder)
    else:
        records = read_coco_annotations(args.coco_annotations, args.image_folder, args.val_size,
                                        args.test_size, args.seed)
    dropped = Counter()
    usable = tokenize_records(records, args.max_len, dropped)
    check_free_space(out, packed_bytes(len(usable), args))

    # Images first, so that the word map counts only the captions of images that were kept.
    bad_images = []
    kept = {split: [] for split in SPLITS}
    split_files = {}
    partial = {split: out / f".{split}.h5.partial" for split in SPLITS}
    try:
        for split in SPLITS:
            split_files[split] = h5py.File(partial[split], "w")
            split_files[split].create_dataset(
                "images", shape=(0, 3, args.image_size, args.image_size),
                maxshape=(None, 3, args.image_size, args.image_size), dtype="uint8",
                chunks=(1, 3, args.image_size, args.image_size))
        write_images(usable, split_files, args, kept, bad_images)
        word_map = build_word_map([r["tokens"] for r in kept["train"]], args.min_word_freq)
        for split in SPLITS:
            write_captions(split_files[split], kept[split], word_map, args)
            split_files[split].close()  # HDF5 writes the file's metadata now: a full disk can stop it here
        # The JSON files before the split files take their names: renaming needs no space.
        for split in SPLITS:
            write_meta(out, split, [r["meta"] for r in kept[split]])
        write_json(out / WORD_MAP, word_map)
    except BaseException:
        # Stopped (an error, a full disk, Ctrl-C, or SIGTERM, which main turns into SystemExit):
        # nothing half-written stays behind.
        for f in split_files.values():
            with contextlib.suppress(OSError):  # a file the full disk would not let close
                f.close()
        for path in partial.values():
            path.unlink(missing_ok=True)
        raise

    for split in SPLITS:
        partial[split].replace(split_file(out, split))
    manifest = {
        "format_version": 1, "dataset": args.dataset, "image_size": args.image_size,
        "captions_per_image": args.captions_per_image, "max_len": args.max_len,
        "min_word_freq": args.min_word_freq, "vocab_size": len(word_map),
        "images": {split: len(kept[split]) for split in SPLITS},
        "has_objects": any(r["objects"] for r in usable),
        "dropped": {**dict(dropped), "bad_images": len(bad_images)}, "bad_images": bad_images,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def image_meta(record):
    """One image's entry in {split}_meta.json.

    "file" is absolute, so that caption.py finds the image (and its boxes) from any folder.
    "references" holds every caption of the image, tokenised, however many there are: eval.py
    scores against exactly these, each once, as the official COCO scorer does, while the split
    file holds --captions-per-image of them for training and the teacher-forced loss.
    """
    return {"file": os.path.abspath(record["path"]), "name": record["name"], "image_id": record["image_id"],
            "captions": record["captions"], "references": record["references"],
            "objects": normalised_objects(record, record["path"])}


def write_captions(h5, records, word_map, args):
    """Encode each image's captions (exactly captions_per_image of them) into the split file."""
    cpi = args.captions_per_image
    h5.attrs["captions_per_image"] = cpi
    captions = np.zeros((len(records) * cpi, args.max_len + 2), dtype=np.int32)
    lengths = np.zeros(len(records) * cpi, dtype=np.int32)
    for i, record in enumerate(records):
        # Seeded per image, so the choice does not depend on worker scheduling or other images, and
        # by the image's name within the dataset, so not on where the dataset lies on disk.
        rng = random.Random(f"{args.seed}/{record['image_id']}/{record['name']}")
        tokens = record["tokens"]
        if len(tokens) < cpi:
            chosen = tokens + [rng.choice(tokens) for _ in range(cpi - len(tokens))]
        else:
            chosen = rng.sample(tokens, k=cpi)
        for j, caption in enumerate(chosen):
            captions[i * cpi + j], lengths[i * cpi + j] = encode_caption(caption, word_map, args.max_len)
    h5.create_dataset("captions", data=captions)
    h5.create_dataset("lengths", data=lengths)


def exit_on_sigterm(signum, _frame):
    """SIGTERM (a scheduler's time limit, `kill`) unwinds like Ctrl-C, so pack() removes its partial files."""
    raise SystemExit(128 + signum)


def main(argv=None):
    """Pack a dataset; print what was kept and dropped."""
    args = parse_args(argv)
    ignore_pillow_warnings()
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        manifest = pack(args)
    except OSError as exc:
        full = disk_full(exc)
        if full is None:
            raise
        raise UserError(f"{args.output_folder}: the disk filled up while packing ({full.strerror}); no "
                        f"{MANIFEST} marks the folder finished, so train.py will not read it: free some space "
                        "and run again") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"packed {manifest['images']} images into {args.output_folder}, "
          f"vocabulary {manifest['vocab_size']} words")
    dropped = {k: v for k, v in manifest["dropped"].items() if v}
    if dropped:
        print("dropped: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in dropped.items()))
    for bad in manifest["bad_images"]:
        print(f"  skipped bad image: {bad['file']} ({bad['reason']})")
    for split in (s for s in SPLITS if not manifest["images"][s]):
        print(f"note: the {split} split is empty: " + ("train.py needs it" if split != "test"
                                                      else "eval.py --split test will have nothing to score"))
    return manifest


if __name__ == "__main__":
    run_main(lambda: main(), "create_input_files.py")
