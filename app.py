"""A web page that captions your own photo and shows where the model looked for each word.

    make app-install   # once: Gradio, for the page only, in a venv of its own (.venv-app)
    .venv-app/bin/python app.py --checkpoint runs/demo/train/best.pt --data-folder runs/demo/data
    .venv-app/bin/python app.py --checkpoint runs/coco/best.pt --port 8080 --beam-size 5

Open the address it prints, drop an image on the page (or pick an example): it shows at once, in its
own proportions, and the chooser is ready for the next one. Click the words of the caption to see each
one's attention over the image, drawn as caption.py's figure draws it. The caption comes from caption.py's own
`caption_image`, so it is the one `python caption.py --img FILE --beam-size N` prints, character for
character, and the figure offered for download is the one `caption.py --out` writes. With
--data-folder, the examples are that dataset's test images, and an image of the dataset that has
object annotations (the shapes set) gets its boxes drawn, whether picked or uploaded.

The page works offline: Gradio serves its own bundled front end (no CDN, fonts included), and
telemetry, update checks and the monitoring endpoint are turned off.
"""

import argparse
import copy
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from beam_search import LENGTH_PENALTY_HELP
from beam_search import MAX_STEPS, is_unfinished
from caption import (DISPLAY_SIDE, attention_figure, attention_panel, caption_image, caption_text, known_objects,
                     load_photo, small_image_note)
from checkpoints import check_word_maps_match, models_from_checkpoint
from datasets import meta_file
from models import HARD_READS
from utils import UserError, ignore_pillow_warnings, read_json, release_freed_memory, resolve_device, run_main

# Set before Gradio is imported, since it reads them then: no usage reports, no version check against
# its servers, no Hugging Face Hub calls, no server-side rendering (which would need Node).
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_SSR_MODE": "False", "DO_NOT_TRACK": "1"}
APP_REQUIREMENTS = "requirements-app.txt"
FIGURE_MAX_AGE_S = 3600  # figures offered for download are deleted after an hour


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path, default=Path("runs/demo/train/best.pt"),
                       help="a checkpoint written by train.py (default runs/demo/train/best.pt, from make demo)")
    model.add_argument("--data-folder", type=Path, default=None,
                       help="packed dataset the checkpoint was trained on: its test images become the examples "
                            "and its object boxes are drawn (default: none)")
    model.add_argument("--beam-size", type=int, default=3,
                       help="the page's starting beam size (default 3, as caption.py)")
    model.add_argument("--max-beam-size", type=int, default=10,
                       help="largest beam size the page offers (default 10)")
    model.add_argument("--max-steps", type=int, default=MAX_STEPS,
                       help=f"most words per caption, <end> included (default {MAX_STEPS}, as caption.py)")
    model.add_argument("--examples", type=int, default=4,
                       help="how many test images to offer as examples (default 4)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    server.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    server.add_argument("--concurrency", type=int, default=2,
                        help="requests captioned at once; more wait in a queue (default 2)")
    server.add_argument("--max-file-mb", type=int, default=50, help="largest upload accepted, in MB (default 50)")
    server.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    if not 1 <= args.beam_size <= args.max_beam_size or args.max_steps < 1:
        parser.error("--beam-size must be between 1 and --max-beam-size, and --max-steps at least 1")
    if args.examples < 0 or args.concurrency < 1 or args.max_file_mb < 1:
        parser.error("--examples must be at least 0, --concurrency and --max-file-mb at least 1")
    return args

# ----------------------------------------------------------------------------------------------
# Captioning, without Gradio: what the page shows, computed by caption.py's functions


@dataclass
class Result:
    """One captioned image: what the page shows and the figure is drawn from."""
    name: str  # the uploaded file's name, for the figure's name and the messages
    words: list  # the caption, as caption.py prints it: " ".join(words)
    alphas: torch.Tensor  # (len(words), P) attention of each word
    pixels: np.ndarray  # (3, H, W) uint8: the photo in its own proportions (caption.load_photo)
    objects: list  # the dataset's object boxes for this image, or []
    note: str = ""  # something the user should know about the input (a tiny image)
    mark_cells: bool = False  # a hard model that read one cell per word: the views mark that cell
    max_steps: int = MAX_STEPS  # where decoding stopped if the model never said <end>

    @property
    def caption(self):
        """The caption as one line, as caption.py prints it (marked when cut off at max_steps)."""
        return caption_text(self.words, self.max_steps)

    @property
    def unfinished(self):
        """Whether the caption was cut off at max_steps without <end>."""
        return is_unfinished(self.words, self.max_steps)


def file_digest(path):
    """SHA-256 of a file's bytes: how an upload is recognised as one of the dataset's images."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def objects_by_digest(data_folder):
    """{file digest: object boxes} for the packed dataset's images that have annotations.

    caption.known_objects keys them by path, but an upload arrives as a copy under another name.
    """
    by_path = known_objects(data_folder)
    return {file_digest(path): objects for path, objects in tqdm(by_path.items(), desc="indexing object boxes",
                                                                 file=sys.stderr, disable=not by_path)
            if Path(path).is_file()}


def example_images(data_folder, count):
    """The first `count` test images of a packed dataset that are still on disk."""
    meta = read_json(meta_file(data_folder, "test"), "test split metadata from create_input_files.py")
    files = [Path(image["file"]) for image in meta["images"]]
    return [str(path.resolve()) for path in files if path.is_file()][:count]


class Captioner:
    """The model loaded once, shared by every request; each request's results are its own."""

    def __init__(self, checkpoint, device, max_steps=MAX_STEPS, data_folder=None):
        self.device = device
        self.max_steps = max_steps
        self.encoder, self.decoder, self.state = models_from_checkpoint(checkpoint, device)
        # What a hard model reads is an attribute of the decoder, and requests run at once: each choice
        # gets its own shallow copy of the decoder, which shares the parameters and differs in hard_read.
        self.decoders = {read: copy.copy(self.decoder) for read in HARD_READS}
        for read, decoder in self.decoders.items():
            decoder.hard_read = read
        self.objects = {}
        if data_folder is not None:
            check_word_maps_match(self.state["word_map"], data_folder, checkpoint)
            self.objects = objects_by_digest(data_folder)
        self.figure_dir = Path(tempfile.mkdtemp(prefix="caption-app-figures-"))
        self._figure_lock = threading.Lock()  # matplotlib's pyplot keeps global state: one figure at a time

    @property
    def grid(self):
        """Side of the attention grid: P = grid * grid."""
        return self.encoder.encoded_size

    @property
    def hard(self):
        """Whether the model reads one cell per word (hard attention)."""
        return self.decoder.attention_type == "hard"

    def caption(self, path, beam_size, length_penalty=0.0, hard_read="argmax"):
        """Caption an image file exactly as caption.py does with these flags; UserError (naming the
        file) when it cannot. hard_read matters for hard-attention models only, as in caption.py."""
        path = Path(path)
        try:
            words, alphas, pixels = caption_image(self.encoder, self.decoders[hard_read], self.state["word_map"],
                                                  path, self.state["image_size"], beam_size, self.max_steps,
                                                  self.device, length_penalty)
        finally:
            release_freed_memory()  # the decoded photo's pages, whichever worker thread decoded it
        return Result(name=path.name, words=words, alphas=alphas.cpu(), pixels=pixels,
                      objects=self.objects.get(file_digest(path), []), note=small_image_note(path),
                      mark_cells=self.hard and hard_read == "argmax", max_steps=self.max_steps)

    def figure(self, result):
        """Write caption.py's attention figure for `result` to a fresh file; returns its path."""
        self._delete_old_figures()
        out = self.figure_dir / uuid.uuid4().hex / f"{Path(result.name).stem}_attention.png"
        with self._figure_lock:
            attention_figure(result.pixels, result.words, result.alphas, self.grid, out, result.objects or None,
                             result.mark_cells, unfinished_at=result.max_steps if result.unfinished else None)
        return out

    def _delete_old_figures(self):
        """Remove figures written more than FIGURE_MAX_AGE_S ago (Gradio has its own copy once served)."""
        cutoff = time.time() - FIGURE_MAX_AGE_S
        for folder in self.figure_dir.iterdir():
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)


def attention_view(result, step):
    """The photo with word `step`'s attention on it, as that word's panel of caption.py's figure
    (caption.attention_panel): (H, W, 3) uint8 in the photo's own proportions, longest side DISPLAY_SIDE."""
    grid = int(round(result.alphas.shape[1] ** 0.5))
    return attention_panel(result.pixels, result.alphas[step], grid, result.objects, result.mark_cells)


def photo_preview(path):
    """The uploaded photo as the page shows it before its caption is ready: (H, W, 3) uint8 in its own
    proportions, or None when it cannot be read (captioning reports why)."""
    try:
        return load_photo(path).transpose(1, 2, 0)
    except Exception:
        return None


def friendly_error(exc, path):
    """One sentence for the page: the file's own name instead of the server's temporary path."""
    if isinstance(exc, UserError):
        return str(exc).replace(str(path), Path(path).name)
    traceback.print_exc()  # not the user's fault: keep the details for whoever runs the server
    return f"{Path(path).name}: could not be captioned ({exc.__class__.__name__}: {exc})."

# ----------------------------------------------------------------------------------------------
# The page (Gradio is imported only here, so the functions above work and are tested without it)


def import_gradio():
    """Gradio, set up to stay offline; UserError naming the requirements file when it is missing."""
    os.environ.update(OFFLINE_ENV)
    try:
        import gradio
    except ImportError:
        raise UserError(f"Gradio is not installed; install the page's requirements with "
                        f"`make app-install` (a venv of its own, .venv-app, from {APP_REQUIREMENTS})") from None
    return gradio


def word_choices(result):
    """The caption's words as (label, step) pairs for the clickable words; a word may repeat."""
    return [(word, step) for step, word in enumerate(result.words)]


def word_label(result, step):
    """What the attention view shows, in words."""
    return f"Where the model looked for word {step + 1} of {len(result.words)}: **{result.words[step]}**"


def page_handlers(gr, captioner, max_beam_size):
    """The page's actions as functions of their inputs; each returns gr updates for its outputs."""

    def new_photo(path, beam_size, length_penalty=0.0, hard_read="argmax"):
        """A new photo (uploaded or an example) -> first its preview, at once, with the chooser emptied
        for the next photo and the last photo's results cleared; then caption()'s outputs. Each yield is
        caption()'s outputs, then preview, photo path, chooser. The chooser just emptied: nothing changes."""
        if not path:
            yield (gr.skip(),) * 10
            return
        waiting = (f"Captioning {Path(path).name} ...", "", gr.update(choices=[], value=None), None, "", None, None)
        yield (*waiting, photo_preview(path), path, None)
        yield (*caption(path, beam_size, length_penalty, hard_read), gr.skip(), gr.skip(), gr.skip())

    def caption(path, beam_size, length_penalty=0.0, hard_read="argmax"):
        """A photo (or a decoding setting changed) -> status, caption, words, attention view, label,
        state, figure. No photo (the chooser just emptied, or nothing uploaded yet): nothing changes."""
        cleared = (gr.update(choices=[], value=None), None, "", None, None)
        if not path:
            return (gr.skip(),) * 7
        if not (isinstance(beam_size, (int, float)) and 1 <= int(beam_size) <= max_beam_size):
            return (f"Beam size must be between 1 and {max_beam_size}.", "", *cleared)
        if not (isinstance(length_penalty, (int, float)) and 0 <= length_penalty < float("inf")):
            return ("The length penalty must be a number, 0 or more.", "", *cleared)
        if hard_read not in HARD_READS:
            return (f"What a hard model reads must be one of {', '.join(HARD_READS)}.", "", *cleared)
        try:
            result = captioner.caption(path, int(beam_size), float(length_penalty), hard_read)
        except Exception as exc:  # anything at all: the page shows a message and stays usable
            return (friendly_error(exc, path), "", *cleared)
        if not result.words:
            return (f"{result.name}: the model wrote an empty caption.", "", *cleared)
        settings = f"beam size {int(beam_size)}" + (f", length penalty {length_penalty:g}" if length_penalty else "")
        if captioner.hard:
            settings += f", reading {'the most likely cell' if hard_read == 'argmax' else 'the expectation'}"
        status = result.note or f"{result.name}, {settings}."
        return (status, result.caption, gr.update(choices=word_choices(result), value=0),
                attention_view(result, 0), word_label(result, 0), result, None)

    def show_word(step, result):
        """A clicked word -> its attention view and label."""
        if result is None or step is None or not 0 <= int(step) < len(result.words):
            return None, ""
        return attention_view(result, int(step)), word_label(result, int(step))

    def figure(result):
        """The figure caption.py --out writes, as a file to download."""
        if result is None:
            return None
        return str(captioner.figure(result))

    return new_photo, caption, show_word, figure


def build_page(captioner, examples=(), beam_size=3, max_beam_size=10):
    """The Gradio page: upload, beam size, caption, clickable words, attention view, figure download."""
    gr = import_gradio()
    new_photo, caption, show_word, figure = page_handlers(gr, captioner, max_beam_size)
    with gr.Blocks(title="Show, Attend and Tell", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# Show, Attend and Tell\nDrop an image to caption it, then click a word to see where "
                    "the model looked when it wrote that word.")
        result = gr.State(None, time_to_live=FIGURE_MAX_AGE_S)
        photo = gr.State(None, time_to_live=FIGURE_MAX_AGE_S)  # the photo's path: the chooser is emptied
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Your image (drop it here or click to upload)", type="filepath",
                                 elem_id="upload")
                preview = gr.Image(label="Your photo", type="numpy", interactive=False, format="jpeg",
                                   elem_id="preview")
                if examples:
                    gr.Examples([[path] for path in examples], inputs=[upload], label="Or pick a test image")
                beam = gr.Slider(1, max_beam_size, value=beam_size, step=1, label="Beam size (1 is greedy)",
                                 elem_id="beam")
                with gr.Accordion("More decoding settings", open=False):
                    # caption.py's --length-penalty and --hard-read, passed on to caption_image as they are.
                    penalty = gr.Number(0.0, minimum=0, step=0.1, label="Length penalty (0 is none)",
                                        info=LENGTH_PENALTY_HELP, elem_id="length-penalty")
                    hard_read = gr.Radio(list(HARD_READS), value="argmax", visible=captioner.hard,
                                         label="What the hard-attention model reads at each word",
                                         info="argmax: the most likely cell, marked on the image; "
                                              "expectation: the attention-weighted mean, drawn as a map",
                                         elem_id="hard-read")
                status = gr.Markdown("Drop an image above, or pick an example.", elem_id="status")
            with gr.Column():
                caption_box = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                words = gr.Radio(choices=[], label="Words: click one to see its attention", elem_id="words")
                label = gr.Markdown(elem_id="word-label")
                view = gr.Image(label="Attention (what the word looked at stays bright)", type="numpy",
                                interactive=False, format="png", elem_id="attention")
                make_figure = gr.Button("Make the figure caption.py draws (PNG)", elem_id="make-figure")
                figure_file = gr.File(label="Figure", interactive=False, elem_id="figure")
        outputs = [status, caption_box, words, view, label, result, figure_file]
        # A new image (uploaded or picked) or a new decoding setting captions again; "/caption" is the
        # endpoint scripts call (gradio_client: predict(handle_file(path), beam_size, length_penalty,
        # hard_read, api_name="/caption"), whose first two outputs are the status and the caption).
        # A new photo shows at once and empties the chooser for the next one; its caption follows (one
        # event, two updates). The photo's path is kept in `photo` for the settings that caption again.
        upload.change(new_photo, [upload, beam, penalty, hard_read], [*outputs, preview, photo, upload],
                      api_name="caption")
        settings = [photo, beam, penalty, hard_read]
        beam.release(caption, settings, outputs, api_name=False)
        penalty.submit(caption, settings, outputs, api_name=False)
        hard_read.input(caption, settings, outputs, api_name=False)
        words.input(show_word, [words, result], [view, label], api_name="word")
        make_figure.click(figure, [result], [figure_file], api_name="figure")
    return page


def main(argv=None):
    """Load the model and serve the page until interrupted."""
    args = parse_args(argv)
    ignore_pillow_warnings()
    import_gradio()  # before the model loads: a missing Gradio is reported at once
    captioner = Captioner(args.checkpoint, resolve_device(args.device), args.max_steps, args.data_folder)
    examples = example_images(args.data_folder, args.examples) if args.data_folder else []
    page = build_page(captioner, examples, args.beam_size, args.max_beam_size)
    page.queue(default_concurrency_limit=args.concurrency)
    page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                max_file_size=f"{args.max_file_mb}mb", enable_monitoring=False, ssr_mode=False,
                footer_links=["api"], allowed_paths=[str(Path(p).parent) for p in examples] or None,
                prevent_thread_lock=True)
    print(f"app.py: captioning with {args.checkpoint}; open {page.local_url} in a browser (Ctrl-C stops it)",
          flush=True)
    page.block_thread()


if __name__ == "__main__":
    run_main(lambda: main(), "app.py")
