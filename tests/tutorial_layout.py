"""sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning as its files lay it out, written at any size: the
modules its checkpoints pickle (its class and attribute names) and its beam search on them, its
checkpoints as PyTorch 0.4 wrote them and as a later PyTorch saves them, and its packed data folder.
tests/test_tutorial_convert.py builds on these, and

    python tests/tutorial_layout.py --images 3000 --runs 3
    python tests/tutorial_layout.py --what checkpoint --runs 5

time convert_tutorial.py's data conversion on a generated folder of that many 256x256 images, and its
checkpoint conversion on a checkpoint of the released model's sizes, in both of torch.save's formats.
"""
import argparse
import copyreg
import inspect
import json
import pickle
import shutil
import statistics
import struct
import sys
import tempfile
import time
import types
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.backends import thnn

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


def tutorial_encode(encoder, images):
    """What the tutorial's Encoder computes for images (B, 3, S, S): the ResNet's children, the pool,
    then one row per grid cell (B, P, E)."""
    features = encoder.adaptive_pool(encoder.resnet(images))  # (B, E, s, s)
    return features.permute(0, 2, 3, 1).flatten(1, 2)  # (B, P, E)


def tutorial_step(decoder, encoder_out, words, h, c):
    """One word of the tutorial's decoder at inference, from its own layers: attention over
    encoder_out (s, P, E), the sigmoid gate, the LSTM cell. Returns log-probabilities (s, V), h, c."""
    attention = decoder.attention
    scores = attention.full_att(attention.relu(attention.encoder_att(encoder_out)
                                               + attention.decoder_att(h).unsqueeze(1))).squeeze(2)  # (s, P)
    alpha = attention.softmax(scores)  # (s, P)
    context = decoder.sigmoid(decoder.f_beta(h)) * (encoder_out * alpha.unsqueeze(2)).sum(dim=1)  # (s, E)
    h, c = decoder.decode_step(torch.cat([decoder.embedding(words), context], dim=1), (h, c))  # (s, D) each
    return torch.log_softmax(decoder.fc(h), dim=1), h, c


def tutorial_beam_search(encoder, decoder, image, start, end, beam_size, max_steps):
    """The tutorial caption.py's beam search for one image (3, S, S), on its own modules: the k live
    sequences grow by their k best continuations; one that emits <end> is set aside and k shrinks by
    one; it stops when k is 0 or after max_steps words. The set-aside sequence of highest summed
    log-probability wins, returned without <start> and <end>; None when none ended."""
    encoder_out = tutorial_encode(encoder, image.unsqueeze(0))  # (1, P, E)
    mean = encoder_out.mean(dim=1)  # (1, E)
    h, c = decoder.init_h(mean), decoder.init_c(mean)  # (1, D) each
    k, sequences, scores, complete = beam_size, [[start]], torch.zeros(1), []
    for step in range(1, max_steps + 1):
        words = torch.tensor([sequence[-1] for sequence in sequences])  # (s,)
        log_probs, h, c = tutorial_step(decoder, encoder_out.expand(len(sequences), -1, -1), words, h, c)
        candidates = scores.unsqueeze(1) + log_probs  # (s, V)
        # At the first step every row is the same <start>: the k best words of row 0.
        top_scores, top = (candidates[0] if step == 1 else candidates.flatten()).topk(k)  # (k,) each
        parents, next_words = top // candidates.shape[1], top % candidates.shape[1]
        grown = [sequences[p] + [w] for p, w in zip(parents.tolist(), next_words.tolist())]
        ended = [i for i, w in enumerate(next_words.tolist()) if w == end]
        going = [i for i, w in enumerate(next_words.tolist()) if w != end]
        complete += [(grown[i][1:-1], float(top_scores[i])) for i in ended]
        k -= len(ended)
        if k == 0:
            break
        sequences, scores = [grown[i] for i in going], top_scores[going]
        h, c = h[parents[going]], c[parents[going]]
    return max(complete, key=lambda done: done[1])[0] if complete else None


TUTORIAL_MODULE = types.ModuleType("models")
TUTORIAL_MODULE.__file__ = __file__  # where inspect finds the classes' source, as 0.4's torch.save read it
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
                             epochs_since_improvement=1, bleu4=0.21, zip_archive=True, **extra):
    """A checkpoint as the tutorial's utils.save_checkpoint writes it, whole modules and optimisers,
    with today's torch.save: a zip archive, or its legacy format if not zip_archive."""
    state = {"epoch": epoch, "epochs_since_improvement": epochs_since_improvement, "bleu-4": bleu4,
             "encoder": encoder, "decoder": decoder, "encoder_optimizer": encoder_optimizer,
             "decoder_optimizer": decoder_optimizer, **extra}
    with tutorial_models_module():
        torch.save(state, path, _use_new_zipfile_serialization=zip_archive)
    return path


# ----------------------------------------------------------------------------------------------
# The same checkpoint as PyTorch 0.4 wrote it (the tutorial's stated version, and its released file)
#
# What differs from a torch.save today, each choice as 0.4's torch/serialization.py, nn.Module,
# Tensor, Parameter and Optimizer wrote it:
#  - the legacy layout, not a zip archive: five pickles back to back (a magic number, the format
#    version 1001, sys_info, the object, the sorted storage keys), then each storage's raw bytes;
#  - pickle protocol 2, 0.4's torch.save default, so every class is named by a GLOBAL opcode;
#  - each storage's persistent id ('storage', torch.cuda.FloatStorage, key, 'cuda:0', numel, None):
#    the released file was written on a GPU, so a CPU-only machine must map 'cuda:0' back;
#  - each nn.Module class first pickled as the persistent id ('module', class, source file, source),
#    0.4's check that the class's source has not changed since;
#  - a module is NEWOBJ of its class then BUILD of its __dict__: 0.4's eight Module attributes
#    (`_backend` first, then _parameters, _buffers, three hook dicts, _modules, training) and its
#    own public attributes; none of the attributes later versions added;
#  - `_backend` pickled by THNNFunctionBackend.__reduce__ as a call to
#    torch.nn.backends.thnn._get_thnn_function_backend(), one backend object memoised after the first;
#  - a Parameter reduced to Parameter(tensor, requires_grad), a tensor to
#    torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, None): 0.4 passed
#    the tensor's _backward_hooks, None without hooks;
#  - BatchNorm2d without num_batches_tracked, a buffer 0.4.1 added (pass batches_tracked=True for 0.4.1);
#  - an Adam pickled whole: NEWOBJ then its __getstate__ {defaults, state, param_groups}, its state a
#    defaultdict(dict) keyed by the very Parameters the modules hold, with `step` a Python int and no
#    keys the later Adam added (maximize, foreach, capturable, differentiable, fused).

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c  # torch.serialization's, unchanged since 0.1
LEGACY_FORMAT_VERSION = 1001
MODULE_ATTRIBUTES_04 = ("_parameters", "_buffers", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks",
                        "_modules", "training")
ADAM_GROUP_KEYS_04 = ("params", "lr", "betas", "eps", "weight_decay", "amsgrad")
CUDA_STORAGES = {torch.float32: torch.cuda.FloatStorage, torch.int64: torch.cuda.LongStorage}


class Backend04:
    """Stands for 0.4's one THNNFunctionBackend object, which every module's `_backend` held."""


class StorageRef:
    """A tensor's storage, written as a persistent id and its bytes after the pickles."""

    def __init__(self, tensor):
        self.tensor = tensor.detach().contiguous()
        self.key = str(tensor.untyped_storage().data_ptr())  # 0.4 keyed a storage by its C pointer


class TensorOf04:
    """A Parameter's data, pickled as 0.4's super(Parameter, self) was: a tensor with its requires_grad."""

    def __init__(self, parameter):
        self.parameter = parameter


class Torch04Pickler(pickle.Pickler):
    """pickle.Pickler writing modules, tensors and optimisers as PyTorch 0.4's torch.save did."""

    def __init__(self, file, batches_tracked):
        super().__init__(file, protocol=2)
        self.storages, self.sourced, self.backend, self.batches_tracked = {}, set(), Backend04(), batches_tracked

    def persistent_id(self, obj):
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj not in self.sourced:
            self.sourced.add(obj)
            return ("module", obj, inspect.getsourcefile(obj), inspect.getsource(obj))
        if isinstance(obj, StorageRef):
            self.storages[obj.key] = obj.tensor
            return ("storage", CUDA_STORAGES[obj.tensor.dtype], obj.key, "cuda:0", obj.tensor.numel(), None)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Backend04):
            return thnn._get_thnn_function_backend, ()
        if isinstance(obj, nn.Parameter):
            return nn.Parameter, (TensorOf04(obj), obj.requires_grad)
        if isinstance(obj, (torch.Tensor, TensorOf04)):
            tensor = obj.parameter if isinstance(obj, TensorOf04) else obj
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), "a view"
            return torch._utils._rebuild_tensor_v2, (StorageRef(tensor), 0, tuple(tensor.shape), tensor.stride(),
                                                     tensor.requires_grad, None)
        if isinstance(obj, nn.Module):
            return copyreg.__newobj__, (type(obj),), self.module_state(obj)
        if isinstance(obj, torch.optim.Adam):
            return copyreg.__newobj__, (type(obj),), self.adam_state(obj)
        return NotImplemented

    def module_state(self, module):
        """0.4's Module.__dict__ for `module`."""
        state = {"_backend": self.backend}
        state.update((name, getattr(module, name)) for name in MODULE_ATTRIBUTES_04)
        state["_buffers"] = OrderedDict((k, v) for k, v in module._buffers.items()
                                        if k != "num_batches_tracked" or self.batches_tracked)
        state.update((k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training")
        return state

    def adam_state(self, optimizer):
        """0.4's Adam.__getstate__ for `optimizer`."""
        moments = defaultdict(dict)
        for p, s in optimizer.state.items():
            moments[p] = {"step": int(s["step"]), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
        groups = [{k: g[k] for k in ADAM_GROUP_KEYS_04} for g in optimizer.param_groups]
        defaults = {k: optimizer.defaults[k] for k in ADAM_GROUP_KEYS_04[1:]}
        return {"defaults": defaults, "state": moments, "param_groups": groups}


def save_torch04(obj, path, batches_tracked=False):
    """Write `obj` to `path` as PyTorch 0.4's torch.save did (see above); returns path."""
    sys_info = {"protocol_version": LEGACY_FORMAT_VERSION, "little_endian": sys.byteorder == "little",
                "type_sizes": {"short": 2, "int": 4, "long": 8}}
    with open(path, "wb") as f, tutorial_models_module():
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_FORMAT_VERSION, sys_info):
            pickle.dump(header, f, protocol=2)
        pickler = Torch04Pickler(f, batches_tracked)
        pickler.dump(obj)
        keys = sorted(pickler.storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:  # as 0.4's storage._write_file: the number of elements, then the raw bytes
            tensor = pickler.storages[key]
            f.write(struct.pack("<q", tensor.numel()))
            f.write(tensor.numpy().tobytes())
    return path


def save_tutorial_checkpoint_04(path, encoder, decoder, encoder_optimizer, decoder_optimizer, epoch=3,
                                epochs_since_improvement=1, bleu4=0.21, batches_tracked=False, **extra):
    """save_tutorial_checkpoint's dict (the tutorial's key order), written as PyTorch 0.4 wrote it."""
    state = {"epoch": epoch, "epochs_since_improvement": epochs_since_improvement, "bleu-4": bleu4,
             "encoder": encoder, "decoder": decoder, "encoder_optimizer": encoder_optimizer,
             "decoder_optimizer": decoder_optimizer, **extra}
    return save_torch04(state, path, batches_tracked)


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
    """Time convert_tutorial.py's data conversion, or its checkpoint conversion; print the medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=("data", "checkpoint"), default="data",
                        help="data: a generated tutorial folder; checkpoint: a checkpoint of the released model's "
                             "sizes, as PyTorch 0.4 wrote it and saved again as a zip archive (default data)")
    parser.add_argument("--images", type=int, default=3000, help="images in the folder, 80/10/10 per cent "
                                                                 "train/val/test (default 3000)")
    parser.add_argument("--runs", type=int, default=3, help="conversions timed; the median is printed (default 3)")
    parser.add_argument("--chunk-images", type=int, default=256, help="convert_tutorial.py's --chunk-images")
    args = parser.parse_args(argv)
    if args.what == "checkpoint":
        measure_checkpoint(args.runs)
    else:
        measure_data(args.images, args.runs, args.chunk_images)


def measure_checkpoint(runs):
    """Write a checkpoint of the released model's sizes (ResNet-101 frozen, 512-wide decoder, the
    released word map's 9490 words; random weights) in both formats; time, interleaved per run, the
    opcode scan of the legacy file and the whole conversion of each."""
    import convert_tutorial
    import safe_unpickle

    torch.manual_seed(0)
    word_map = tutorial_word_map([f"w{i}" for i in range(9490 - 4)])
    encoder = Encoder(14, "resnet101")
    encoder.fine_tune(False)
    decoder = DecoderWithAttention(512, 512, 512, len(word_map))
    optimizers = tutorial_optimizers(encoder, decoder)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"torch0.4": save_tutorial_checkpoint_04(Path(tmp) / "legacy.pth.tar", encoder, decoder, *optimizers),
                 "zip": save_tutorial_checkpoint(Path(tmp) / "zip.pth.tar", encoder, decoder, *optimizers)}
        sizes = {name: path.stat().st_size / 1e6 for name, path in paths.items()}
        seconds = {"scan torch0.4": [], "convert torch0.4": [], "convert zip": []}
        for _ in range(runs):
            started = time.perf_counter()
            safe_unpickle.pickled_globals(paths["torch0.4"])
            seconds["scan torch0.4"].append(time.perf_counter() - started)
            for name in ("torch0.4", "zip"):
                started = time.perf_counter()
                convert_tutorial.convert_checkpoint(paths[name], word_map, 256)
                seconds[f"convert {name}"].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"checkpoint files: {sizes['torch0.4']:.0f} MB (torch0.4), {sizes['zip']:.0f} MB (zip); {runs} runs")
    for name, values in seconds.items():
        print(f"{name:18} {', '.join(f'{v:.2f}' for v in values)} s: median {medians[name]:.2f} s")
    print(f"ratio convert torch0.4 / convert zip: {medians['convert torch0.4'] / medians['convert zip']:.2f}; "
          f"scan / convert torch0.4: {medians['scan torch0.4'] / medians['convert torch0.4']:.2f}")


def measure_data(images, runs, chunk_images):
    """Write a tutorial folder of `images` 256x256 images, convert it `runs` times, print the median."""
    import convert_tutorial

    counts = {"TRAIN": images * 8 // 10, "VAL": images // 10}
    counts["TEST"] = images - sum(counts.values())
    word_map = tutorial_word_map([f"w{i}" for i in range(2000)])
    with tempfile.TemporaryDirectory() as tmp:
        write_tutorial_folder(Path(tmp) / "tutorial", counts, word_map, max_len=50)
        seconds = []
        for run in range(runs):
            started = time.perf_counter()
            convert_tutorial.convert_data(Path(tmp) / "tutorial", Path(tmp) / f"out{run}", chunk_images=chunk_images)
            seconds.append(time.perf_counter() - started)
            shutil.rmtree(Path(tmp) / f"out{run}")  # each run writes into an empty folder
        gigabytes = images * 3 * 256 * 256 / 1e9
    median = statistics.median(seconds)
    print(f"converted {images} images ({gigabytes:.2f} GB) in {', '.join(f'{s:.2f}' for s in seconds)} s: "
          f"median {median:.2f} s, {images / median:.0f} images/s, {gigabytes / median:.2f} GB/s")


if __name__ == "__main__":
    measure()
