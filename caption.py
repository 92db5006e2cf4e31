r"""Caption one image (or every image in a folder) and draw where the model looked for each word.

    python caption.py --img img/example.jpg --checkpoint runs/coco/best.pt --out caption.png
    python caption.py --img photos/ --checkpoint runs/coco/best.pt --out figures/
    python caption.py --img data/shapes/images/shapes_000007.jpg --checkpoint runs/demo/train/best.pt \
        --data-folder runs/demo/data --out runs/demo/attention.png

The figure shows the image, then one panel per word with that step's attention map upsampled and
laid over the image (for a hard-attention model, which reads one cell per word, that cell is marked
instead). With --data-folder, an image from the packed dataset that has object
annotations (the shapes set) gets its object boxes drawn too.

Where figures go (--out): a name ending in .png, .jpg, .jpeg, .pdf or .svg is one figure in that
format (for one --img file); anything else, or a folder that exists, is a folder (made if needed)
that gets one figure per image, named after the image file: photo.jpg -> photo_jpg_attention.png.
An image that cannot be read is reported in one line and skipped; the exit code is 1 if any was.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from beam_search import LENGTH_PENALTY_HELP
from checkpoints import models_from_checkpoint
from datasets import SPLITS, decode_tokens, meta_file
from models import HARD_READS
from utils import (IMAGE_SUFFIXES, UserError, keep_freed_memory, list_images, load_image, normalize_images,
                   read_json, resolve_device, run_main)


FIGURE_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img", type=Path, required=True, help="an image file, or a folder of images")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by train.py")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size (default 3; 1 is greedy)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help=LENGTH_PENALTY_HELP)
    parser.add_argument("--max-steps", type=int, default=50, help="most words per caption (default 50)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the attention figures go: a file ending in " + ", ".join(FIGURE_FORMATS)
                             + " (one --img file), or a folder that gets <image>_<ext>_attention.png per "
                               "image (default: print the captions only)")
    parser.add_argument("--data-folder", type=Path, default=None,
                        help="packed dataset the image comes from, to draw its object boxes when known")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--hard-read", choices=HARD_READS, default="argmax",
                        help="what a hard-attention model reads at each word: the most likely cell (default), "
                             "marked in the figure, or the expectation, drawn as a map; soft models ignore it")
    args = parser.parse_args(argv)
    if args.beam_size < 1 or args.max_steps < 1:
        parser.error("--beam-size and --max-steps must be at least 1")
    if args.length_penalty < 0:
        parser.error("--length-penalty must be at least 0")
    return args


def known_objects(data_folder):
    """{key: objects with normalised boxes} of a packed folder's images, keyed both by the image's
    absolute path and by its name within the dataset (images/shapes_000007.jpg), so that an image is
    found from any folder, and after the dataset moved (see objects_of)."""
    objects = {}
    for split in SPLITS:
        path = meta_file(data_folder, split)
        if path.is_file():
            for image in read_json(path, "split metadata from create_input_files.py")["images"]:
                if image.get("objects"):
                    objects[str(Path(image["file"]).resolve())] = image["objects"]
                    if image.get("name"):
                        objects[image["name"]] = image["objects"]
    return objects


def objects_of(path, boxes):
    """The objects `boxes` (known_objects) holds for the image file `path`, or None: by absolute path,
    else by the path's last parts as the dataset names them."""
    path = Path(path).resolve()
    if str(path) in boxes:
        return boxes[str(path)]
    for depth in range(1, min(len(path.parts), 4) + 1):  # Karpathy's names are filepath/filename
        name = str(Path(*path.parts[-depth:]))
        if name in boxes:
            return boxes[name]
    return None


def figure_path(out, image, several, used):
    """Where the figure of `image` goes under --out (see the module docstring); `used` holds the
    names given so far, so two images never share a figure."""
    if out.suffix.lower() in set(IMAGE_SUFFIXES) - set(FIGURE_FORMATS) and not out.is_dir():
        raise UserError(f"{out}: figures are written as {', '.join(FIGURE_FORMATS)}; name such a file, or a folder")
    if out.suffix.lower() in FIGURE_FORMATS and not out.is_dir():
        if several:
            raise UserError(f"{out}: --img is a folder, so --out must be a folder too (a name without "
                            f"{', '.join(FIGURE_FORMATS)})")
        return out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; name a folder, or a file ending in "
                        + ", ".join(FIGURE_FORMATS))
    name = f"{image.stem}_{image.suffix.lstrip('.')}_attention" if image.suffix else f"{image.name}_attention"
    candidate, n = f"{name}.png", 1
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}.png"
    used.add(candidate)
    return out / candidate


def attention_figure(image, words, alphas, grid, out_path, objects=None, mark_cells=False):
    """Save the image and one panel per word with its attention map (grid x grid) laid over it, or
    with `mark_cells` (a hard model that reads one cell) the cell it read, the map's argmax, marked.

    image: (3, S, S) uint8; words: list of str; alphas: (len(words), P) float.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    pixels = image.transpose(1, 2, 0)  # (S, S, 3)
    size = pixels.shape[0]
    panels = len(words) + 1
    columns = min(panels, 6)
    rows = (panels + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    titles = ["<image>"] + words
    maps = [None] + [a.view(grid, grid)[None, None] for a in alphas]
    for ax, title, attention in zip(axes.flat, titles, maps):
        ax.imshow(pixels)
        if attention is not None and mark_cells:
            row, col = divmod(int(attention.argmax()), grid)
            cell = size / grid
            ax.add_patch(patches.Rectangle((col * cell, row * cell), cell, cell, facecolor=(0, 1, 1, 0.35),
                                           edgecolor="cyan", linewidth=2.5))
        elif attention is not None:
            upsampled = torch.nn.functional.interpolate(attention.float(), size=(size, size), mode="bilinear",
                                                        align_corners=False)[0, 0].numpy()  # (S, S)
            ax.imshow(upsampled / max(upsampled.max(), 1e-12), cmap="gray", alpha=0.65, vmin=0, vmax=1)
        for obj in objects or []:
            x0, y0, x1, y1 = (np.array(obj["bbox"]) * size).tolist()
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime",
                                           linewidth=1.2))
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=90, format=out_path.suffix.lstrip(".").lower() or "png")
        tmp.replace(out_path)  # a figure is there whole or not at all
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def caption_image(encoder, decoder, word_map, path, image_size, beam_size, max_steps, device, length_penalty=0.0):
    """Caption one image file; returns (words, attention maps (len(words), P), uint8 pixels)."""
    pixels = load_image(path, image_size)  # (3, S, S) uint8
    images = normalize_images(torch.from_numpy(pixels)).unsqueeze(0).to(device)  # (1, 3, S, S)
    tokens, alphas = decoder.beam_search(encoder(images), word_map["<start>"], word_map["<end>"],
                                         beam_size=beam_size, max_steps=max_steps, return_alphas=True,
                                         length_penalty=length_penalty)
    rev_word_map = {v: k for k, v in word_map.items()}
    return decode_tokens(tokens[0], rev_word_map), alphas[0], pixels


def main(argv=None):
    """Caption the images; print each caption and write the figures asked for. Returns
    [(path, words)] of the images captioned; raises UserError at the end if any could not be."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    keep_freed_memory(device)
    images = list_images(args.img)
    several = args.img.is_dir()
    if args.out is not None:
        figure_path(args.out, images[0], several, set())  # refuse a bad --out before loading the model
    encoder, decoder, state = models_from_checkpoint(args.checkpoint, device)
    decoder.hard_read = args.hard_read
    mark_cells = decoder.attention_type == "hard" and args.hard_read == "argmax"
    boxes = known_objects(args.data_folder) if args.data_folder else {}
    results, failed, used = [], [], set()
    for path in images:
        try:
            words, alphas, pixels = caption_image(encoder, decoder, state["word_map"], path, state["image_size"],
                                                  args.beam_size, args.max_steps, device, args.length_penalty)
        except UserError as exc:
            if not several:
                raise
            print(f"skipped: {exc}", file=sys.stderr)
            failed.append(path)
            continue
        print(f"{path}: {' '.join(words)}")
        if args.out is not None:
            objects = objects_of(path, boxes)
            if boxes and objects is None:
                print(f"note: {path} is not among the images packed in {args.data_folder} (by absolute path "
                      "or dataset name), so no object boxes are drawn", file=sys.stderr)
            out = figure_path(args.out, path, several, used)
            attention_figure(pixels, words, alphas, encoder.encoded_size, out, objects, mark_cells)
            print(f"attention figure: {out}")
        results.append((path, words))
    if failed:
        raise UserError(f"{len(failed)} of {len(images)} images in {args.img} could not be captioned "
                        "(listed above); the others were")
    return results


if __name__ == "__main__":
    run_main(lambda: main(), "caption.py")
