"""Caption one image (or every image in a folder) and draw where the model looked for each word.

    python caption.py --img img/example.jpg --checkpoint runs/coco/best.pt --out caption.png
    python caption.py --img photos/ --checkpoint runs/coco/best.pt --out figures/
    python caption.py --img data/shapes/images/shapes_000007.jpg --checkpoint runs/demo/train/best.pt \
        --data-folder runs/demo/data --out runs/demo/attention.png

The figure shows the image, then one panel per word with that step's attention map upsampled and
laid over the image (for a hard-attention model, which reads one cell per word, that cell is marked
instead). With --data-folder, an image from the packed dataset that has object
annotations (the shapes set) gets its object boxes drawn too.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from checkpoints import models_from_checkpoint
from datasets import SPLITS, decode_tokens, meta_file
from models import HARD_READS
from utils import (UserError, keep_freed_memory, list_images, load_image, normalize_images, read_json,
                   resolve_device, run_main)


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img", type=Path, required=True, help="an image file, or a folder of images")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by train.py")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size (default 3; 1 is greedy)")
    parser.add_argument("--max-steps", type=int, default=50, help="most words per caption (default 50)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the attention figure here (a .png file; a folder when --img is a folder)")
    parser.add_argument("--data-folder", type=Path, default=None,
                        help="packed dataset the image comes from, to draw its object boxes when known")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--hard-read", choices=HARD_READS, default="argmax",
                        help="what a hard-attention model reads at each word: the most likely cell (default), "
                             "marked in the figure, or the expectation, drawn as a map; soft models ignore it")
    args = parser.parse_args(argv)
    if args.beam_size < 1 or args.max_steps < 1:
        parser.error("--beam-size and --max-steps must be at least 1")
    return args


def known_objects(data_folder):
    """{resolved image path: objects with normalised boxes} from a packed folder's metadata."""
    objects = {}
    for split in SPLITS:
        path = meta_file(data_folder, split)
        if path.is_file():
            for image in read_json(path, "split metadata from create_input_files.py")["images"]:
                if image.get("objects"):
                    objects[str(Path(image["file"]).resolve())] = image["objects"]
    return objects


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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_path)  # a figure is there whole or not at all


@torch.no_grad()
def caption_image(encoder, decoder, word_map, path, image_size, beam_size, max_steps, device):
    """Caption one image file; returns (words, attention maps (len(words), P), uint8 pixels)."""
    pixels = load_image(path, image_size)  # (3, S, S) uint8
    images = normalize_images(torch.from_numpy(pixels)).unsqueeze(0).to(device)  # (1, 3, S, S)
    tokens, alphas = decoder.beam_search(encoder(images), word_map["<start>"], word_map["<end>"],
                                         beam_size=beam_size, max_steps=max_steps, return_alphas=True)
    rev_word_map = {v: k for k, v in word_map.items()}
    return decode_tokens(tokens[0], rev_word_map), alphas[0], pixels


def main(argv=None):
    """Caption the images; print each caption and write the figures asked for."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    keep_freed_memory(device)
    images = list_images(args.img)
    encoder, decoder, state = models_from_checkpoint(args.checkpoint, device)
    decoder.hard_read = args.hard_read
    mark_cells = decoder.attention_type == "hard" and args.hard_read == "argmax"
    boxes = known_objects(args.data_folder) if args.data_folder else {}
    if args.out is not None and args.img.is_dir() and args.out.suffix:
        raise UserError(f"{args.out}: --img is a folder, so --out must be a folder too")
    results = []
    for path in images:
        words, alphas, pixels = caption_image(encoder, decoder, state["word_map"], path, state["image_size"],
                                              args.beam_size, args.max_steps, device)
        print(f"{path}: {' '.join(words)}")
        if args.out is not None:
            out = args.out / f"{path.stem}_attention.png" if args.img.is_dir() else args.out
            attention_figure(pixels, words, alphas, encoder.encoded_size, out, boxes.get(str(path.resolve())),
                             mark_cells)
            print(f"attention figure: {out}")
        results.append((path, words))
    return results


if __name__ == "__main__":
    run_main(lambda: main(), "caption.py")
