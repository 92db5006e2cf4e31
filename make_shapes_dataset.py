"""Generate a small synthetic captioning dataset of coloured shapes, in Karpathy's JSON format.

    python make_shapes_dataset.py --output-folder data/shapes --num-images 3000
    python create_input_files.py --dataset shapes --karpathy-json data/shapes/dataset_shapes.json --image-folder data/shapes --output-folder data/shapes_packed

Each image holds 1 to 3 non-overlapping shapes on a light grey background and comes with 5 reference
captions built from templates. The dataset goes through exactly the same code path as COCO
(JSON + JPEG files), so the whole pipeline can be trained and checked in minutes on a laptop.

Caption rule that metric code relies on: every object is mentioned as `[size] colour shape`, i.e. the
colour word always comes immediately before the shape noun; no plurals, no absent objects.
The same arguments give byte-identical JSON and JPEG files.
"""
import argparse
import json
import os
import random

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")

# Far apart in RGB so that a JPEG round trip never makes one colour look like another.
COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
}
# Side length in pixels at --image-size 128; scaled linearly for other image sizes.
SIDE_RANGE_AT_128 = {"small": (18, 26), "large": (36, 48)}
NUM_CAPTIONS = 5
BACKGROUND_GREY = 238


def boxes_too_close(box_a, box_b, gap):
    """True if two [x0, y0, x1, y1) boxes overlap or are less than `gap` pixels apart."""
    return (box_a[0] < box_b[2] + gap and box_b[0] < box_a[2] + gap
            and box_a[1] < box_b[3] + gap and box_b[1] < box_a[3] + gap)


def sample_objects(rng, image_size):
    """Draw 1-3 objects with distinct (colour, shape) pairs and non-overlapping boxes inside the image."""
    scale = image_size / 128
    gap = max(1, round(4 * scale))  # keeps shapes visually separate, also from the image border
    num_objects = rng.randint(1, 3)
    while True:  # rejection sampling; a retry from scratch is rare (3 large shapes fill ~30% of the image)
        pairs = rng.sample([(colour, shape) for colour in COLOURS for shape in SHAPES], num_objects)
        objects = []
        for colour, shape in pairs:
            size = rng.choice(SIZES)
            low, high = SIDE_RANGE_AT_128[size]
            side = rng.randint(round(low * scale), round(high * scale))
            for _ in range(50):
                x0 = rng.randint(gap, image_size - gap - side)
                y0 = rng.randint(gap, image_size - gap - side)
                bbox = [x0, y0, x0 + side, y0 + side]
                if not any(boxes_too_close(bbox, other["bbox"], gap) for other in objects):
                    objects.append({"shape": shape, "colour": colour, "size": size, "bbox": bbox})
                    break
            else:
                break  # no room left for this object: start the layout again
        if len(objects) == num_objects:
            return objects


def draw_object(draw, obj):
    """Draw one object filled with its colour; PIL's coordinates are inclusive, our bbox's x1, y1 are not."""
    x0, y0, x1, y1 = obj["bbox"]
    x1, y1 = x1 - 1, y1 - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    fill = COLOUR_RGB[obj["colour"]]
    if obj["shape"] == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif obj["shape"] == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}")


def render_image(objects, image_size, np_rng):
    """Return a PIL RGB image: light grey background with mild grey noise, then the objects on top."""
    noise = np_rng.integers(-8, 9, size=(image_size, image_size, 1))  # (H, W, 1), same for R, G, B
    background = np.repeat(BACKGROUND_GREY + noise, 3, axis=2).clip(0, 255).astype(np.uint8)  # (H, W, 3)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj)
    return image


def relation(box_a, box_b):
    """Where box A lies relative to box B, along the axis on which their centres differ most."""
    dx = (box_a[0] + box_a[2]) - (box_b[0] + box_b[2])  # twice the centre difference; only signs matter
    dy = (box_a[1] + box_a[3]) - (box_b[1] + box_b[3])
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"  # y grows downwards


def phrase(obj, sized, article="a"):
    """Noun phrase for one object, always `article [size] colour shape` (the rule metric code relies on)."""
    words = [article, obj["size"], obj["colour"], obj["shape"]] if sized else [article, obj["colour"], obj["shape"]]
    return " ".join(words)


def make_captions(objects, rng):
    """Return NUM_CAPTIONS distinct captions for the objects, from templates chosen for the object count."""
    def rel(a, b):
        return relation(a["bbox"], b["bbox"])

    # Every colour and size word starts with a consonant, so the article is always "a".
    templates = {
        1: [
            lambda a: phrase(a, True),
            lambda a: phrase(a, False),
            lambda a: f"there is {phrase(a, False)} in the picture",
            lambda a: f"{phrase(a, True)} on a plain background",
            lambda a: f"an image of {phrase(a, True)}",
            lambda a: f"a picture showing {phrase(a, False)}",
        ],
        2: [
            lambda a, b: f"{phrase(a, True)} {rel(a, b)} {phrase(b, True)}",
            lambda a, b: f"{phrase(a, False)} {rel(a, b)} {phrase(b, False)}",
            lambda a, b: f"{phrase(a, False)} and {phrase(b, False)}",
            lambda a, b: f"there is {phrase(a, True)} and {phrase(b, True)} in the picture",
            lambda a, b: f"a picture showing {phrase(a, False)} {rel(a, b)} {phrase(b, True)}",
            lambda a, b: f"{phrase(a, True)} and {phrase(b, False)} on a plain background",
        ],
        3: [
            lambda a, b, c: f"{phrase(a, False)} and {phrase(b, False)} and {phrase(c, False)}",
            lambda a, b, c: f"{phrase(a, True)} {rel(a, b)} {phrase(b, True)} and {phrase(c, True)}",
            lambda a, b, c: (f"{phrase(a, False)} {rel(a, b)} {phrase(b, False)} and "
                             f"{phrase(c, False)} {rel(c, b)} {phrase(b, False, 'the')}"),
            lambda a, b, c: f"there is {phrase(a, True)} with {phrase(b, True)} and {phrase(c, True)} in the picture",
            lambda a, b, c: f"{phrase(a, False)} and {phrase(b, True)} {rel(b, c)} {phrase(c, True)}",
            lambda a, b, c: (f"{phrase(a, True)} {rel(a, b)} {phrase(b, False)} with "
                             f"{phrase(c, True)} {rel(c, a)} {phrase(a, False, 'the')}"),
        ],
    }[len(objects)]
    captions = []
    for template in rng.sample(templates, NUM_CAPTIONS):
        order = rng.sample(objects, len(objects))  # vary which object a template names first
        captions.append(template(*order))
    return captions


def assign_splits(num_images, val_fraction, test_fraction, rng):
    """Return a split name per image from a seeded shuffle; at least one val and one test image if n >= 3."""
    num_val = round(num_images * val_fraction)
    num_test = round(num_images * test_fraction)
    if num_images >= 3:
        num_val = min(max(1, num_val), num_images - 2)
        num_test = min(max(1, num_test), num_images - 1 - num_val)  # always leave a training image
    order = list(range(num_images))
    rng.shuffle(order)
    splits = ["train"] * num_images
    for index in order[:num_val]:
        splits[index] = "val"
    for index in order[num_val:num_val + num_test]:
        splits[index] = "test"
    return splits


def generate_dataset(output_folder, num_images=3000, seed=0, image_size=128, val_fraction=0.1,
                     test_fraction=0.1, show_progress=True):
    """Write the JPEG files and then the Karpathy-format JSON into output_folder; return the JSON path."""
    rng = random.Random(seed)  # layouts, captions and splits
    np_rng = np.random.default_rng(seed)  # background noise
    image_folder = os.path.join(output_folder, "images")
    os.makedirs(image_folder, exist_ok=True)
    json_path = os.path.join(output_folder, "dataset_shapes.json")
    if os.path.exists(json_path):
        # The images are about to be overwritten: a run killed half-way must not leave the old JSON behind.
        os.remove(json_path)

    splits = assign_splits(num_images, val_fraction, test_fraction, rng)
    images = []
    for imgid in tqdm(range(num_images), desc="shapes", disable=not show_progress):
        objects = sample_objects(rng, image_size)
        filename = f"shapes_{imgid:06d}.jpg"
        render_image(objects, image_size, np_rng).save(os.path.join(image_folder, filename), quality=90)
        sentids = list(range(imgid * NUM_CAPTIONS, (imgid + 1) * NUM_CAPTIONS))
        sentences = [{"tokens": raw.split(), "raw": raw, "imgid": imgid, "sentid": sentid}
                     for sentid, raw in zip(sentids, make_captions(objects, rng))]
        images.append({"filepath": "images", "filename": filename, "imgid": imgid, "split": splits[imgid],
                       "sentids": sentids, "sentences": sentences, "width": image_size,
                       "height": image_size, "objects": objects})

    # Written last and atomically, so the JSON never points at images that are not there yet.
    # (A plain open() rather than tempfile, whose files are private (0600) to their owner.)
    temporary_path = json_path + ".tmp"
    with open(temporary_path, "w") as f:
        json.dump({"dataset": "shapes", "images": images}, f)
    os.replace(temporary_path, json_path)
    return json_path


def main(argv=None):
    """Parse the command line and generate the dataset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-folder", default="data/shapes",
                        help="folder that receives images/ and dataset_shapes.json")
    parser.add_argument("--num-images", type=int, default=3000, help="number of images to generate")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--image-size", type=int, default=128, help="side in pixels of the square images")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of images in the val split")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="fraction of images in the test split")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    if args.image_size < 32:
        parser.error("--image-size must be at least 32 so that three large shapes fit")
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        parser.error("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")

    json_path = generate_dataset(args.output_folder, args.num_images, args.seed, args.image_size,
                                 args.val_fraction, args.test_fraction)
    print(f"wrote {args.num_images} images and {json_path}")
    return json_path


if __name__ == "__main__":
    main()
