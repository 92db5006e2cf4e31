"""sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning as its files lay it out, written at any size: the
modules its checkpoints pickle (its class and attribute names; no forward, nothing here runs them),
its checkpoints, and its packed data folder. tests/test_tutorial_convert.py builds on these, and

    python tests/tutorial_layout.py --images 3000 --runs 3

times convert_tutorial.py's data conversion on a generated folder of that many 256x256 images.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ----------------------------------------------------------------------------------------------
# The tutorial's modules: its models.py's classes and attribute names, pickled as module `models`


class Encoder(nn.Module):
    """The tutorial's encoder: a torchvision ResNet without its last two children, then a pool."""

    def __init__(self, encoded_image_size=14, arch="resnet101"):
        super().__init__()
        self.enc_image_size = encoded_image_size
        resnet = getattr(torchvision.models, arch)(weights=None)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        self.fine_tune()

    def fine_tune(self, fine_tune=True):
        """As the tutorial's: everything frozen, then blocks 2-4 (children 5+) trainable if fine_tune."""
        for p in self.resnet.parameters():
            p.requires_grad = False
        for block in list(self.resnet.children())[5:]:
            for p in block.parameters():
                p.requires_grad = fine_tune


class Attention(nn.Module):
    """The tutorial's attention layers."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)


class DecoderWithAttention(nn.Module):
    """The tutorial's decoder: its LSTM cell is `decode_step`, and it keeps a Sigmoid module."""

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__()
        self.encoder_dim, self.attention_dim, self.embed_dim = encoder_dim, attention_dim, embed_dim
        self.decoder_dim, self.vocab_size = decoder_dim, vocab_size
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)


TUTORIAL_MODULE = types.ModuleType("models")
for _cls in (Encoder, Attention, DecoderWithAttention):
    _cls.__module__ = "models"  # what pickle records, as for the tutorial's own models.py
    setattr(TUTORIAL_MODULE, _cls.__name__, _cls)


@contextmanager
def tutorial_models_module():
    """Let pickle find the classes above as `models.X` (this repo's models.py is `models` otherwise)."""
    saved = sys.modules.get("models")
    sys.modules["models"] = TUTORIAL_MODULE
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["models"]
        else:
            sys.modules["models"] = saved


def tutorial_modules(encoder, decoder, arch, fine_tune):
    """The tutorial's Encoder and DecoderWithAttention holding the weights of this repo's `encoder`
    and `decoder` (built with the whole ResNet up to layer4, as the tutorial's is)."""
    tutorial_encoder = Encoder(encoder.encoded_size, arch)
    tutorial_encoder.load_state_dict(encoder.state_dict())
    tutorial_encoder.fine_tune(fine_tune)
    attention = decoder.attention
    tutorial_decoder = DecoderWithAttention(attention.encoder_att.out_features, decoder.embedding.embedding_dim,
                                            decoder.lstm.hidden_size, decoder.vocab_size, decoder.encoder_dim,
                                            decoder.dropout.p)
    tutorial_decoder.load_state_dict({k.replace("lstm.", "decode_step.", 1) if k.startswith("lstm.") else k: v
                                      for k, v in decoder.state_dict().items()})
    return tutorial_encoder, tutorial_decoder


def tutorial_optimizers(encoder, decoder, decoder_lr=4e-4, encoder_lr=1e-4, steps=1):
    """Adam over the trainable parameters, as the tutorial's train.py builds them (the encoder's is
    None when frozen), after `steps` steps on random gradients: their moments are not empty, and the
    steps run at learning rate 0 so that the weights stay those of the modules given."""
    decoder_optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=0.0)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    encoder_optimizer = torch.optim.Adam(trainable, lr=0.0) if trainable else None
    generator = torch.Generator().manual_seed(0)
    for optimizer, lr in ((decoder_optimizer, decoder_lr), (encoder_optimizer, encoder_lr)):
        if optimizer is None:
            continue
        for _ in range(steps):
            for p in optimizer.param_groups[0]["params"]:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
    return encoder_optimizer, decoder_optimizer


def save_tutorial_checkpoint(path, encoder, decoder, encoder_optimizer, decoder_optimizer, epoch=3,
                             epochs_since_improvement=1, bleu4=0.21, **extra):
    """A checkpoint as the tutorial's utils.save_checkpoint writes it: whole modules and optimisers."""
    state = {"epoch": epoch, "epochs_since_improvement": epochs_since_improvement, "bleu-4": bleu4,
             "encoder": encoder, "decoder": decoder, "encoder_optimizer": encoder_optimizer,
             "decoder_optimizer": decoder_optimizer, **extra}
    with tutorial_models_module():
        torch.save(state, path)
    return path


# ----------------------------------------------------------------------------------------------
# The tutorial's packed data folder


def tutorial_word_map(words):
    """A word map as the tutorial's create_input_files.py lays it out: words from 1, then <unk>,
    <start>, <end>, and <pad> = 0 last."""
    word_map = {w: i + 1 for i, w in enumerate(words)}
    for token in ("<unk>", "<start>", "<end>"):
        word_map[token] = len(word_map) + 1
    word_map["<pad>"] = 0
    return word_map


def write_tutorial_folder(folder, counts, word_map, base="coco_5_cap_per_img_5_min_word_freq", size=256,
                          captions_per_image=5, max_len=12, seed=0, image_batch=500):
    """The files the tutorial's create_input_files.py writes, with random images and captions:
    {TRAIN,VAL,TEST}_IMAGES_<base>.hdf5, _CAPTIONS_ and _CAPLENS_<base>.json, WORDMAP_<base>.json.
    `counts` is {"TRAIN": n, "VAL": n, "TEST": n}. Returns the base name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = [i for w, i in word_map.items() if not w.startswith("<")]
    (folder / f"WORDMAP_{base}.json").write_text(json.dumps(word_map))
    for split, count in counts.items():
        with h5py.File(folder / f"{split}_IMAGES_{base}.hdf5", "w") as f:
            f.attrs["captions_per_image"] = captions_per_image
            images = f.create_dataset("images", (count, 3, size, size), dtype="uint8")
            for start in range(0, count, image_batch):
                n = min(image_batch, count - start)
                images[start:start + n] = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
        captions, lengths = [], []
        for _ in range(count * captions_per_image):
            caption = [int(w) for w in rng.choice(words, size=int(rng.integers(1, max_len + 1)))]
            captions.append([word_map["<start>"]] + caption + [word_map["<end>"]]
                            + [word_map["<pad>"]] * (max_len - len(caption)))
            lengths.append(len(caption) + 2)
        (folder / f"{split}_CAPTIONS_{base}.json").write_text(json.dumps(captions))
        (folder / f"{split}_CAPLENS_{base}.json").write_text(json.dumps(lengths))
    return base


# ----------------------------------------------------------------------------------------------
# Timing the data conversion


def measure(argv=None):
    """Write a tutorial folder of --images 256x256 images, convert it --runs times, print the medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="images in the folder, 80/10/10 per cent "
                                                                 "train/val/test (default 3000)")
    parser.add_argument("--runs", type=int, default=3, help="conversions timed; the median is printed (default 3)")
    parser.add_argument("--chunk-images", type=int, default=256, help="convert_tutorial.py's --chunk-images")
    args = parser.parse_args(argv)
    import convert_tutorial

    counts = {"TRAIN": args.images * 8 // 10, "VAL": args.images // 10}
    counts["TEST"] = args.images - sum(counts.values())
    word_map = tutorial_word_map([f"w{i}" for i in range(2000)])
    with tempfile.TemporaryDirectory() as tmp:
        write_tutorial_folder(Path(tmp) / "tutorial", counts, word_map, max_len=50)
        seconds = []
        for run in range(args.runs):
            started = time.perf_counter()
            convert_tutorial.convert_data(Path(tmp) / "tutorial", Path(tmp) / f"out{run}",
                                          chunk_images=args.chunk_images)
            seconds.append(time.perf_counter() - started)
            shutil.rmtree(Path(tmp) / f"out{run}")  # each run writes into an empty folder
        gigabytes = args.images * 3 * 256 * 256 / 1e9
    median = statistics.median(seconds)
    print(f"converted {args.images} images ({gigabytes:.2f} GB) in {', '.join(f'{s:.2f}' for s in seconds)} s: "
          f"median {median:.2f} s, {args.images / median:.0f} images/s, {gigabytes / median:.2f} GB/s")


if __name__ == "__main__":
    measure()
