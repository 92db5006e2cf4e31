"""Caption every image of a split with beam search and score the captions.

    python eval.py --checkpoint runs/coco/best.pt --data-folder data/coco_packed --beam-size 3
    python eval.py --checkpoint runs/demo/train/best.pt --data-folder runs/demo/data --split test

Scores against every reference caption of each image, each once, as the official COCO scorer does
(create_input_files.py keeps them all in {split}_meta.json; the split file holds only
--captions-per-image of them, for training). Reports BLEU-1..4 (nltk corpus_bleu), METEOR (needs
Java), ROUGE-L and CIDEr (pycocoevalcap), and the BLEU-4 of a content-free baseline. On a dataset
with object annotations (the shapes set) it also reports whether captions name the right objects
and whether attention lands on the object a word names.
Writes captions as a COCO results JSON and the metrics as JSON into --output-dir.
"""

import argparse
import random
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from beam_search import LENGTH_PENALTY_HELP, MAX_STEPS, is_unfinished
from checkpoints import check_word_maps_match, models_from_checkpoint
from datasets import SPLITS, CaptionDataset, decode_tokens, meta_file, reference_tokens
from metrics import bleu_scores, coco_caption_metrics, content_scores, grounding_scores
from models import HARD_READS
from utils import UserError, keep_freed_memory, read_json, resolve_device, run_main, write_json


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by train.py")
    parser.add_argument("--data-folder", type=Path, required=True,
                        help="output folder of create_input_files.py, packed with the checkpoint's word map")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to caption (default test)")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size (default 3; 1 is greedy)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help=LENGTH_PENALTY_HELP)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS,
                        help=f"most words per caption, <end> included (default {MAX_STEPS}, as the tutorial); "
                             "the report says how many captions were cut off there")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images decoded together, all their beams in one batch (default 64)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where captions and metrics go (default: beside the checkpoint)")
    parser.add_argument("--coco-metrics", action=argparse.BooleanOptionalAction, default=True,
                        help="also compute METEOR, ROUGE-L and CIDEr with pycocoevalcap (default on)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the content-free baseline's pairing")
    parser.add_argument("--hard-read", choices=HARD_READS, default="argmax",
                        help="what a hard-attention model reads at each word: the most likely cell (default) "
                             "or the expectation over the cells, as soft attention does; soft models ignore it")
    args = parser.parse_args(argv)
    if args.beam_size < 1 or args.max_steps < 1 or args.batch_size < 1:
        parser.error("--beam-size, --max-steps and --batch-size must be at least 1")
    if args.length_penalty < 0:
        parser.error("--length-penalty must be at least 0")
    return args


@torch.no_grad()
def decode_split(encoder, decoder, dataset, word_map, beam_size, max_steps, batch_size, device, workers=0,
                 return_alphas=False, show_progress=True, length_penalty=0.0):
    """Beam-search every image of `dataset` (per-image items), finished beams ranked with `length_penalty`.

    Returns lists over images, in dataset order: hypotheses (token ids), references (lists of token
    ids, special tokens removed) and, with return_alphas, each word's attention map (len, P).
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    hypotheses, references, alphas = [], [], []
    for images, captions, lengths, _ in tqdm(loader, desc=f"decoding (beam {beam_size})", unit="batch",
                                             file=sys.stderr, disable=not show_progress):
        images = images.to(device, non_blocking=True)
        result = decoder.beam_search(encoder(images), word_map["<start>"], word_map["<end>"],
                                     beam_size=beam_size, max_steps=max_steps, return_alphas=return_alphas,
                                     length_penalty=length_penalty)
        tokens, maps = result if return_alphas else (result, [None] * len(result))
        hypotheses.extend(tokens)
        alphas.extend(maps)
        for caps, lens in zip(captions, lengths):
            references.append(reference_tokens(caps, lens, word_map))
    return (hypotheses, references, alphas) if return_alphas else (hypotheses, references)


def content_free_baseline(references, objects_per_image, seed):
    """Each image gets a reference caption of another image (with as many objects, when known).

    What BLEU rewards in such captions is wording alone: a caption model must beat it to show
    that it looks at the image.
    """
    groups = {}
    for i, objects in enumerate(objects_per_image):
        groups.setdefault(len(objects) if objects is not None else 0, []).append(i)
    rng = random.Random(seed)
    baseline = [None] * len(references)
    for members in groups.values():
        order = members[:]
        rng.shuffle(order)
        for position, i in enumerate(order):
            donor = order[(position + 1) % len(order)]  # itself only when alone in its group
            baseline[i] = references[donor][0]
    return baseline


def scoring_references(meta, packed_references, rev_word_map, data_folder):
    """Every reference caption of each image (word lists), and notes for the report.

    Folders packed before create_input_files.py kept all references in the metadata have only the
    packed captions: those are used then, with a note, since they miss an image's extra captions
    and repeat some when it has fewer, and so do not give the official scorer's figures.
    """
    if all("references" in m for m in meta):
        return [m["references"] for m in meta], []
    note = (f"{data_folder} was packed before every reference was kept: scored against the packed captions "
            "(extra ones missing, some repeated, rare words as <unk>); pack again for the official protocol")
    return [[decode_tokens(r, rev_word_map) for r in refs] for refs in packed_references], [note]


def evaluate(encoder, decoder, word_map, data_folder, split, beam_size, max_steps, batch_size, device,
             workers=0, coco_metrics=True, seed=0, show_progress=True, length_penalty=0.0):
    """Decode a split and compute every metric; returns (metrics dict, captions as word lists)."""
    dataset = CaptionDataset(data_folder, split, per_image=True)
    if len(dataset) == 0:
        raise UserError(f"{data_folder}: the {split} split has no images, so there is nothing to score; "
                        "choose another --split, or pack again with images in this one")
    meta = read_json(meta_file(data_folder, split), "the split's metadata from create_input_files.py")["images"]
    hypotheses, packed_references, alphas = decode_split(encoder, decoder, dataset, word_map, beam_size, max_steps,
                                                         batch_size, device, workers, return_alphas=True,
                                                         show_progress=show_progress, length_penalty=length_penalty)
    rev_word_map = {v: k for k, v in word_map.items()}
    hyp_words = [decode_tokens(h, rev_word_map) for h in hypotheses]
    ref_words, notes = scoring_references(meta, packed_references, rev_word_map, data_folder)

    unfinished = sum(is_unfinished(h, max_steps) for h in hypotheses)
    metrics = {"split": split, "beam_size": beam_size, "length_penalty": length_penalty, "images": len(hypotheses),
               "max_steps": max_steps, "unfinished_captions": unfinished,
               "attention": decoder.attention_type,
               **({"hard_read": decoder.hard_read} if decoder.attention_type == "hard" else {}),
               "output_layer": decoder.output_layer, **bleu_scores(ref_words, hyp_words)}
    if coco_metrics:
        if show_progress:
            print(f"scoring {len(hyp_words)} captions: METEOR (Java), ROUGE-L, CIDEr ...", file=sys.stderr, flush=True)
        scores, coco_notes = coco_caption_metrics(ref_words, hyp_words)
        metrics.update(scores)
        notes += coco_notes

    objects = [m.get("objects") for m in meta]
    baseline = content_free_baseline(ref_words, objects, seed)
    metrics["baseline_bleu4"] = bleu_scores(ref_words, baseline)["bleu4"]
    if all(o is not None for o in objects) and objects:
        metrics.update(content_scores(hyp_words, objects))
        metrics["baseline_content_accuracy"] = content_scores(baseline, objects)["content_accuracy"]
        grid = encoder.encoded_size
        metrics.update(grounding_scores(hyp_words, alphas, objects, grid))
    if unfinished:
        notes.append(f"{unfinished} of {len(hypotheses)} captions were unfinished: stopped at {max_steps} words "
                     "without <end> (--max-steps)")
    metrics["notes"] = notes
    captions = [{"image_id": m["image_id"], "caption": " ".join(w)} for m, w in zip(meta, hyp_words)]
    return metrics, captions


def format_metrics(metrics):
    """The metrics as aligned lines for the terminal."""
    lines = []
    for key, value in metrics.items():
        if key == "notes":
            lines.extend(f"note: {n}" for n in value)
        elif isinstance(value, float):
            lines.append(f"{key:32s} {value:.4f}")
        else:
            lines.append(f"{key:32s} {value}")
    return "\n".join(lines)


def main(argv=None):
    """Evaluate a checkpoint on a split; returns the metrics."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    keep_freed_memory(device)
    encoder, decoder, state = models_from_checkpoint(args.checkpoint, device)
    decoder.hard_read = args.hard_read
    check_word_maps_match(state["word_map"], args.data_folder, args.checkpoint)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # packed images have one size: cuDNN picks its fastest kernels
    metrics, captions = evaluate(encoder, decoder, state["word_map"], args.data_folder, args.split,
                                 args.beam_size, args.max_steps, args.batch_size, device, args.workers,
                                 args.coco_metrics, args.seed, length_penalty=args.length_penalty)
    metrics["checkpoint"] = str(args.checkpoint)
    output_dir = args.output_dir or args.checkpoint.parent
    # A length penalty gets its own files; at 0 the names stay those of plain beam search.
    stem = f"{args.split}_beam{args.beam_size}" + (f"_lp{args.length_penalty:g}" if args.length_penalty else "")
    write_json(output_dir / f"captions_{stem}.json", captions)
    write_json(output_dir / f"metrics_{stem}.json", metrics)
    print(format_metrics(metrics))
    print(f"wrote {output_dir / f'metrics_{stem}.json'} and {output_dir / f'captions_{stem}.json'}")
    return metrics


if __name__ == "__main__":
    run_main(lambda: main(), "eval.py")
