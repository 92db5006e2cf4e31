r"""Caption one image (or every image in a folder) and draw where the model looked for each word.

    python caption.py --img img/example.jpg --checkpoint runs/coco/best.pt --out caption.png
    python caption.py --img photos/ --checkpoint runs/coco/best.pt --out figures/
    python caption.py --img data/shapes/images/shapes_000007.jpg --checkpoint runs/demo/train/best.pt \
        --data-folder runs/demo/data --out runs/demo/attention.png

The figure shows the image in its own proportions, then one panel per word with that step's attention
map stretched over it as the model's resize stretched the image to a square, so that each cell covers
the pixels it saw: the attended part keeps its brightness and the rest is dimmed, as in the paper's
figures (for a hard-attention model, which reads one cell per word, that cell is lit and marked
instead). With --data-folder, an image from the packed dataset that has object annotations (the shapes
set) gets its object boxes drawn too. A caption that reached --max-steps without <end> is printed, and
titled in its figure, as unfinished.

Where figures go (--out): a name ending in .png, .jpg, .jpeg, .pdf or .svg is one figure in that
format (for one --img file); anything else, or a folder that exists, is a folder (made if needed)
that gets one figure per image, named after the image file: photo.jpg -> photo_jpg_attention.png.
An image that cannot be read is reported in one line and skipped; the exit code is 1 if any was.
"""

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from beam_search import LENGTH_PENALTY_HELP, MAX_STEPS, is_unfinished
from checkpoints import models_from_checkpoint
from datasets import SPLITS, decode_tokens, meta_file
from models import HARD_READS
from utils import (IMAGE_SUFFIXES, UserError, ignore_pillow_warnings, keep_freed_memory, list_images, load_image,
                   normalize_images, read_json, resolve_device, run_main, upright_rgb)


FIGURE_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
FIGURE_DPI = 90
PANEL_INCHES = 2.2  # the longer side of a figure's panel
DISPLAY_SIDE = 384  # pixels of a photo's longest side as drawn: a 64x64 demo image is too small to read
SMALL_IMAGE_SIDE = 16  # below this many pixels a side, the caption says little; caption.py and the page say so
DIM = 0.25  # brightness left where a word's map is 0: the paper's figures dim what was not attended


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img", type=Path, required=True, help="an image file, or a folder of images")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by train.py")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size (default 3; 1 is greedy)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help=LENGTH_PENALTY_HELP)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS,
                        help=f"most words per caption, <end> included (default {MAX_STEPS}, as the tutorial); a "
                             "caption cut off there is marked unfinished")
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


def load_photo(path, longest_side=DISPLAY_SIDE):
    """The image file as it is shown: (3, H, W) uint8 in its own proportions (EXIF orientation honoured,
    any mode made RGB as for the model), resized so that its longest side is `longest_side` pixels."""
    with Image.open(path) as image:  # decoded lazily: resized before the file closes
        upright = upright_rgb(image, longest_side)  # a phone photo decodes at 1/2..1/8 scale
        scale = longest_side / max(upright.size)
        size = tuple(max(1, round(side * scale)) for side in upright.size)  # (W, H)
        pixels = np.asarray(upright.resize(size, Image.Resampling.BICUBIC))  # (H, W, 3)
    return pixels.transpose(2, 0, 1).copy()  # (3, H, W)


def small_image_note(path):
    """The one warning for an image too small to caption well (fewer than SMALL_IMAGE_SIDE pixels a
    side), or "": caption.py prints it, the page shows it."""
    with Image.open(path) as image:
        width, height = image.size
    if min(width, height) >= SMALL_IMAGE_SIDE:
        return ""
    return (f"{Path(path).name} is only {width}x{height} pixels; it was stretched to the model's input size, "
            "so the caption says little about it.")


def caption_text(words, max_steps):
    """The caption as one line, marked when it was cut off at max_steps without <end>."""
    text = " ".join(words)
    return f"{text} ... (unfinished: stopped at {max_steps} words)" if is_unfinished(words, max_steps) else text


def stretched_map(alpha, grid, height, width):
    """A word's map (P,) as a (height, width) array: the grid stretched over the whole photo as the
    encoder's resize stretched the photo onto the grid, so each cell covers the pixels it saw; scaled
    from 0 where the map is least to 1 where it peaks, as the paper's figures draw it (a flat map: all 1),
    so that a model whose maps are spread still shows where it looked most."""
    attention = alpha.detach().float().cpu().view(1, 1, grid, grid)  # (1, 1, grid, grid), row-major as P
    upsampled = torch.nn.functional.interpolate(attention, size=(height, width), mode="bilinear",
                                                align_corners=False)[0, 0]  # (H, W)
    low, high = upsampled.min(), upsampled.max()
    if high - low < 1e-12:
        return np.ones((height, width), dtype=np.float32)
    return ((upsampled - low) / (high - low)).numpy()


def attention_panel(photo, alpha, grid, objects=None, mark_cell=False):
    """What the figure and the page show for one word: the photo (3, H, W) uint8 with the word's map
    alpha (P,) on it, as (H, W, 3) uint8; alpha None gives the photo itself.

    As in the paper's figures, the attended part keeps its brightness and the rest is dimmed (to DIM
    where the map is least), so it reads on a busy photo. With mark_cell (a hard model reading one cell)
    the cell read, the map's argmax, is lit, tinted and outlined in cyan. Object boxes in green."""
    pixels = photo.transpose(1, 2, 0).astype(np.float32)  # (H, W, 3)
    height, width = pixels.shape[:2]
    cell = None
    if alpha is not None and mark_cell:
        row, col = divmod(int(alpha.argmax()), grid)
        cell = [col * width / grid, row * height / grid, (col + 1) * width / grid, (row + 1) * height / grid]
        lit = np.full((height, width), DIM, dtype=np.float32)  # (H, W)
        lit[round(cell[1]):round(cell[3]), round(cell[0]):round(cell[2])] = 1.0
        pixels = pixels * lit[..., None]
    elif alpha is not None:
        pixels = pixels * (DIM + (1 - DIM) * stretched_map(alpha, grid, height, width))[..., None]  # (H, W, 3)
    view = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))
    if cell is not None:
        tint = Image.new("RGBA", view.size, (0, 0, 0, 0))
        ImageDraw.Draw(tint).rectangle(cell, fill=(0, 255, 255, 90))
        view = Image.alpha_composite(view.convert("RGBA"), tint).convert("RGB")
        ImageDraw.Draw(view).rectangle(cell, outline=(0, 255, 255), width=3)
    draw = ImageDraw.Draw(view)
    for obj in objects or []:
        x0, y0, x1, y1 = obj["bbox"]
        draw.rectangle([x0 * width, y0 * height, x1 * width, y1 * height], outline=(0, 255, 0), width=2)
    return np.asarray(view)


def draw_figure(image, words, alphas, grid, objects=None, mark_cells=False, unfinished_at=None):
    """The attention figure as a matplotlib figure: the image, then one panel per word (attention_panel),
    each panel in the image's own proportions; titled as unfinished when unfinished_at (max steps) is given."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    height, width = image.shape[1:]
    panel_w, panel_h = PANEL_INCHES * min(1.0, width / height), PANEL_INCHES * min(1.0, height / width)
    panels = len(words) + 1
    columns = min(panels, 6)
    rows = (panels + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(max(panel_w, 0.8) * columns, (panel_h + 0.45) * rows + 0.3),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    views = [attention_panel(image, None, grid, objects)]
    views += [attention_panel(image, alpha, grid, objects, mark_cells) for alpha in alphas]  # word i: its own map
    for ax, title, view in zip(axes.flat, ["<image>"] + list(words), views):
        ax.imshow(view)
        ax.set_title(title, fontsize=11)
    if unfinished_at:
        fig.suptitle(f"unfinished: stopped at {unfinished_at} words, no <end>", fontsize=11, color="firebrick")
    fig.tight_layout()
    return fig


def attention_figure(image, words, alphas, grid, out_path, objects=None, mark_cells=False, unfinished_at=None):
    """Save the image and one panel per word with its attention map (grid x grid) on it, or with
    `mark_cells` (a hard model that reads one cell) the cell it read, the map's argmax, marked.

    image: (3, H, W) uint8, any proportions (the map is stretched onto it as the encoder's resize
    stretched the image); words: list of str; alphas: (len(words), P) float; unfinished_at: the max
    steps a caption cut off without <end> stopped at, said in the figure's title (None: finished).
    """
    import matplotlib.pyplot as plt

    fig = draw_figure(image, words, alphas, grid, objects, mark_cells, unfinished_at)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=FIGURE_DPI, format=out_path.suffix.lstrip(".").lower() or "png")
        tmp.replace(out_path)  # a figure is there whole or not at all
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def attention_figure_array(image, words, alphas, grid, objects=None, mark_cells=False, unfinished_at=None):
    """attention_figure's PNG as an (H, W, 3) uint8 array (for TensorBoard, or to read its pixels back)."""
    import matplotlib.pyplot as plt

    fig = draw_figure(image, words, alphas, grid, objects, mark_cells, unfinished_at)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=FIGURE_DPI, format="png")
    finally:
        plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


@torch.no_grad()
def caption_image(encoder, decoder, word_map, path, image_size, beam_size, max_steps, device, length_penalty=0.0):
    """Caption one image file; returns (words, attention maps (len(words), P), the photo as shown:
    load_photo's (3, H, W) uint8 in its own proportions). The model sees it squashed to a square."""
    pixels = load_image(path, image_size)  # (3, S, S) uint8
    images = normalize_images(torch.from_numpy(pixels)).unsqueeze(0).to(device)  # (1, 3, S, S)
    tokens, alphas = decoder.beam_search(encoder(images), word_map["<start>"], word_map["<end>"],
                                         beam_size=beam_size, max_steps=max_steps, return_alphas=True,
                                         length_penalty=length_penalty)
    rev_word_map = {v: k for k, v in word_map.items()}
    return decode_tokens(tokens[0], rev_word_map), alphas[0], load_photo(path)


def main(argv=None):
    """Caption the images; print each caption and write the figures asked for. Returns
    [(path, words)] of the images captioned; raises UserError at the end if any could not be."""
    args = parse_args(argv)
    ignore_pillow_warnings()
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
    results, failed, used, unboxed = [], [], set(), []
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
        print(f"{path}: {caption_text(words, args.max_steps)}")
        if small_image_note(path):
            print(f"note: {small_image_note(path)}", file=sys.stderr)
        if args.out is not None:
            objects = objects_of(path, boxes)
            if boxes and objects is None:
                unboxed.append(path)
            out = figure_path(args.out, path, several, used)
            attention_figure(pixels, words, alphas, encoder.encoded_size, out, objects, mark_cells,
                             unfinished_at=args.max_steps if is_unfinished(words, args.max_steps) else None)
            print(f"attention figure: {out}")
        results.append((path, words))
    if unboxed:  # one line for the lot: a folder of one's own photos would otherwise get a note each
        print(f"note: {len(unboxed)} of {len(images)} images are not among the images packed in {args.data_folder} "
              "(by absolute path or dataset name), so their figures have no object boxes", file=sys.stderr)
    if failed:
        raise UserError(f"{len(failed)} of {len(images)} images in {args.img} could not be captioned "
                        "(listed above); the others were")
    return results


if __name__ == "__main__":
    run_main(lambda: main(), "caption.py")
