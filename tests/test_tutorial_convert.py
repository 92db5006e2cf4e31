"""convert_tutorial.py: the tutorial's checkpoints (read without running what they name) and packed
folders, written here in the tutorial's layout at tiny sizes, into this repo's formats."""
import argparse
import json
import os
import re
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import caption
import convert_tutorial
import eval as evaluate_script
import train
from checkpoints import build_models, load_checkpoint
from datasets import CaptionDataset, decode_tokens, read_manifest
from tutorial_layout import (save_tutorial_checkpoint, tutorial_modules, tutorial_optimizers, tutorial_word_map,
                             write_tutorial_folder)
from utils import UserError, normalize_images

# The tutorial's model at a tiny size: the whole ResNet up to layer4, as its encoder is, but ResNet-18
# on 64x64 images pooled to a 4x4 grid.
ARCH, IMAGE_SIZE = "resnet18", 64
TINY = {"encoder_arch": "resnet18", "encoder_cut_after": "layer4", "encoded_size": 4, "attention_dim": 32,
        "embed_dim": 16, "decoder_dim": 32, "dropout": 0.5, "pretrained": False, "encoder_weights": None,
        "fine_tune_encoder": False}
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "small", "large"]
COUNTS = {"TRAIN": 6, "VAL": 3, "TEST": 5}


def tiny_models(seed=0, vocab_size=len(WORDS) + 4):
    """This repo's encoder and decoder at TINY sizes, randomly initialised from `seed`."""
    torch.manual_seed(seed)
    return build_models(TINY, vocab_size)


def tutorial_checkpoint(path, encoder, decoder, fine_tune=True, decoder_lr=4e-4 * 0.8, **extra):
    """`encoder` and `decoder` saved as the tutorial saves them, with Adam state; returns its modules
    and optimisers."""
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune)
    optimizers = tutorial_optimizers(*modules, decoder_lr=decoder_lr)
    save_tutorial_checkpoint(path, *modules, *optimizers, **extra)
    return modules, optimizers


@pytest.fixture(scope="module")
def tutorial_folder(tmp_path_factory):
    """A tutorial packed folder of 64x64 images (the tutorial's are 256x256; layout as it writes it)."""
    folder = tmp_path_factory.mktemp("tutorial")
    write_tutorial_folder(folder, COUNTS, tutorial_word_map(WORDS), size=IMAGE_SIZE)
    return folder


@pytest.fixture(scope="module")
def converted(tutorial_folder, tmp_path_factory):
    """tutorial_folder converted by the command line's `data`, and a tiny model's tutorial checkpoint
    converted by `checkpoint`; with the original models."""
    out = tmp_path_factory.mktemp("converted")
    convert_tutorial.main(["data", "--tutorial-folder", str(tutorial_folder), "--output-folder", str(out / "data")])
    encoder, decoder = tiny_models()
    path = out / "BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar"
    modules, optimizers = tutorial_checkpoint(path, encoder, decoder)
    convert_tutorial.main(["checkpoint", "--checkpoint", str(path), "--word-map", str(out / "data" / "word_map.json"),
                           "--output", str(out / "converted.pt"), "--image-size", str(IMAGE_SIZE)])
    return {"folder": out, "data": out / "data", "checkpoint": out / "converted.pt", "encoder": encoder,
            "decoder": decoder, "tutorial_modules": modules, "tutorial_optimizers": optimizers}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_eval_and_caption_py_on_converted_files_caption_as_the_original_weights_do(converted, tutorial_folder, tmp_path):
    out = tmp_path / "eval"
    evaluate_script.main(["--checkpoint", str(converted["checkpoint"]), "--data-folder", str(converted["data"]),
                          "--split", "test", "--beam-size", "3", "--max-steps", "12", "--output-dir", str(out),
                          "--workers", "0", "--no-coco-metrics", "--device", "cpu"])
    from_eval = [c["caption"] for c in json.loads((out / "captions_test_beam3.json").read_text())]

    # The same weights decoded here directly, on the images as the tutorial's own file holds them.
    encoder, decoder = converted["encoder"].eval(), converted["decoder"].eval()
    word_map = tutorial_word_map(WORDS)
    words = {i: w for w, i in word_map.items()}
    with h5py.File(tutorial_folder / "TEST_IMAGES_coco_5_cap_per_img_5_min_word_freq.hdf5") as f:
        pixels = f["images"][:]
    images = normalize_images(torch.from_numpy(pixels))
    with torch.no_grad():
        tokens = decoder.beam_search(encoder(images), word_map["<start>"], word_map["<end>"], beam_size=3,
                                     max_steps=12)
    direct = [" ".join(decode_tokens(t, words)) for t in tokens]
    assert len(set(direct)) > 1, "every image got the same caption: the comparison would not see images mixed up"
    assert from_eval == direct

    # caption.py on one of those images, saved as a file (at the packed size, so not resampled).
    Image.fromarray(pixels[2].transpose(1, 2, 0)).save(tmp_path / "photo.png")
    [(_, caption_words)] = caption.main(["--img", str(tmp_path / "photo.png"), "--checkpoint",
                                        str(converted["checkpoint"]), "--beam-size", "3", "--max-steps", "12",
                                        "--device", "cpu"])
    assert " ".join(caption_words) == direct[2]


def test_weights_and_training_state_carry_over(converted):
    state = load_checkpoint(converted["checkpoint"])  # weights_only=True, as eval.py and train.py read it
    for name in ("encoder", "decoder"):
        original = converted[name].state_dict()
        assert state[name].keys() == original.keys()
        assert all(torch.equal(state[name][k], original[k]) for k in original)
    assert state["word_map"] == tutorial_word_map(WORDS) and state["image_size"] == IMAGE_SIZE
    assert state["epoch"] == 4 and state["samples_done"] == 0  # the tutorial finished epoch 3
    assert state["converted_from"]["teacher_forced_bleu4"] == 0.21 and state["best_bleu4"] == -1.0
    expected = {**{k: v for k, v in TINY.items() if k not in ("pretrained", "fine_tune_encoder")},
                "pretrained": True, "fine_tune_encoder": True}
    assert {k: state["args"][k] for k in expected} == expected


def test_adam_moments_are_mapped_to_the_same_parameters(converted):
    state = torch.load(converted["checkpoint"], weights_only=True)
    tutorial_encoder, tutorial_decoder = converted["tutorial_modules"]
    encoder_optimizer, decoder_optimizer = converted["tutorial_optimizers"]
    encoder, decoder = converted["encoder"], converted["decoder"]
    checks = [(decoder, tutorial_decoder, decoder_optimizer, state["decoder_optimizer"]),
              (encoder, tutorial_encoder, encoder_optimizer, state["encoder_optimizer"])]
    for module, tutorial_module, tutorial_optimizer, saved in checks:
        tutorial_params = {tutorial_name(n): p for n, p in tutorial_module.named_parameters()}
        trained = [name for name, _ in module.named_parameters() if tutorial_params[name].requires_grad]
        assert saved["param_groups"][0]["params"] == list(range(len(trained))) and len(trained) > 10
        assert saved["param_groups"][0]["lr"] == tutorial_optimizer.param_groups[0]["lr"]
        for index, name in enumerate(trained):
            tutorial_state = tutorial_optimizer.state[tutorial_params[name]]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(saved["state"][index][key], tutorial_state[key]), (name, key)


def tutorial_name(name):
    """This repo's name of a tutorial parameter (its LSTM cell is `decode_step`, ours `lstm`)."""
    return "lstm." + name[len("decode_step."):] if name.startswith("decode_step.") else name


def test_train_resume_continues_a_converted_checkpoint(converted, tmp_path):
    run = tmp_path / "run"
    train.main(["--data-folder", str(converted["data"]), "--output-dir", str(run), "--resume",
                str(converted["checkpoint"]), "--epochs", "5", "--fine-tune-encoder", "--encoder-arch", "resnet18",
                "--encoded-size", "4", "--attention-dim", "32", "--embed-dim", "16", "--decoder-dim", "32",
                "--workers", "0", "--batch-size", "16", "--device", "cpu"])
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 5 and [row["epoch"] for row in state["history"]] == [4]
    # The tutorial's learning rates (its decoder's had decayed once) came with its Adam state.
    assert state["history"][0]["decoder_lr"] == pytest.approx(4e-4 * 0.8)
    assert state["history"][0]["encoder_lr"] == pytest.approx(1e-4)
    before = converted["encoder"].state_dict()
    assert not torch.equal(state["encoder"]["resnet.7.1.conv2.weight"], before["resnet.7.1.conv2.weight"])
    assert torch.equal(state["encoder"]["resnet.0.weight"], before["resnet.0.weight"])  # block 1: frozen


@pytest.mark.parametrize("fine_tune", [False, True])
def test_fine_tuning_state_is_kept(fine_tune, tmp_path):
    encoder, decoder = tiny_models()
    (tutorial_encoder, _), _ = tutorial_checkpoint(tmp_path / "t.pth.tar", encoder, decoder, fine_tune=fine_tune)
    state, notes = convert_tutorial.convert_checkpoint(tmp_path / "t.pth.tar", tutorial_word_map(WORDS), IMAGE_SIZE)
    assert state["args"]["fine_tune_encoder"] is fine_tune and notes == []
    assert (state["encoder_optimizer"] is None) is not fine_tune
    converted_encoder, _ = build_models(state["args"], len(state["word_map"]), load_weights=False)
    trainable = {n: p.requires_grad for n, p in converted_encoder.named_parameters()}
    assert trainable == {n: p.requires_grad for n, p in tutorial_encoder.named_parameters()}


def test_an_optimiser_that_does_not_map_restarts_and_says_so(tmp_path):
    encoder, decoder = tiny_models()
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune=False)
    _, decoder_optimizer = tutorial_optimizers(*modules)
    decoder_optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})  # a group of its own
    save_tutorial_checkpoint(tmp_path / "t.pth.tar", *modules, None, decoder_optimizer)
    state, notes = convert_tutorial.convert_checkpoint(tmp_path / "t.pth.tar", tutorial_word_map(WORDS), IMAGE_SIZE)
    assert notes == ["the decoder's optimiser state restarts: it is not one Adam parameter group"]
    assert state["decoder_optimizer"]["state"] == {} and state["decoder_optimizer"]["param_groups"][0]["lr"] == 4e-4


class WritesAFile:
    """Unpickling this runs code: it writes `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


class RunsACommand:
    """Unpickling this runs a shell command that creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload, named", [(WritesAFile, "builtins.exec"),
                                            (RunsACommand, f"{os.system.__module__}.system")])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_does_not_run(payload, named, tmp_path):
    encoder, decoder = tiny_models()
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth.tar"
    tutorial_checkpoint(path, encoder, decoder, **{"bleu-4": payload(marker)})  # hidden among real modules
    with pytest.raises(UserError, match=rf"refusing to unpickle {named}, ") as caught:
        convert_tutorial.main(["checkpoint", "--checkpoint", str(path), "--word-map", str(write_word_map(tmp_path)),
                               "--output", str(tmp_path / "out.pt")])
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_the_tutorials_classes_are_read_as_inert_stand_ins_without_importing_models(converted, monkeypatch):
    class NoModels(types.ModuleType):
        def __getattr__(self, name):
            raise AssertionError(f"models.{name} was looked up")

    monkeypatch.setitem(sys.modules, "models", NoModels("models"))
    path = converted["folder"] / "BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar"
    state = convert_tutorial.read_tutorial_checkpoint(path)
    for key, name in (("encoder", "models.Encoder"), ("decoder", "models.DecoderWithAttention"),
                      ("decoder_optimizer", "torch.optim.adam.Adam")):
        assert type(state[key]) is convert_tutorial.STAND_INS[name] and not isinstance(state[key], torch.nn.Module)
    lstm = state["decoder"].state["_modules"]["decode_step"]
    assert lstm.pickled_name == "torch.nn.modules.rnn.LSTMCell" and not isinstance(lstm, torch.nn.Module)


def test_a_class_a_tutorial_checkpoint_never_holds_is_refused_by_name(tmp_path):
    encoder, decoder = tiny_models()
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune=False)
    modules[1].extra = torch.nn.GRUCell(4, 4)
    save_tutorial_checkpoint(tmp_path / "t.pth.tar", *modules, None, None)
    with pytest.raises(UserError, match=r"refusing to unpickle torch\.nn\.modules\.rnn\.GRUCell,"):
        convert_tutorial.read_tutorial_checkpoint(tmp_path / "t.pth.tar")


def write_word_map(folder, words=WORDS):
    """The tutorial's word map for `words` as a file in `folder`."""
    path = Path(folder) / "WORDMAP_test.json"
    path.write_text(json.dumps(tutorial_word_map(words)))
    return path


def test_tensors_that_do_not_fit_are_refused_by_name(tmp_path):
    encoder, decoder = tiny_models()
    tutorial_checkpoint(tmp_path / "t.pth.tar", encoder, decoder)
    with pytest.raises(UserError, match=r"decoder\.embedding\.weight is \(16, 16\), expected \(17, 16\); "
                                        r"decoder\.fc\.bias is \(16,\), expected \(17,\)"):
        convert_tutorial.convert_checkpoint(tmp_path / "t.pth.tar", tutorial_word_map(WORDS + ["extra"]), 64)

    # A decoder with a layer of its own, and an LSTM cell of another input size (named as the tutorial names it).
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune=False)
    modules[1].extra = torch.nn.Linear(3, 3)
    modules[1].decode_step = torch.nn.LSTMCell(7, 32)
    save_tutorial_checkpoint(tmp_path / "odd.pth.tar", *modules, None, None)
    with pytest.raises(UserError) as caught:
        convert_tutorial.convert_checkpoint(tmp_path / "odd.pth.tar", tutorial_word_map(WORDS), 64)
    message = str(caught.value)
    assert "decoder.decode_step.weight_ih is (128, 7), expected (128, 528)" in message
    assert "decoder.extra.weight unexpected" in message and "lstm" not in message


def test_other_files_are_refused_in_one_sentence(tmp_path):
    legacy = tmp_path / "legacy.pth.tar"
    torch.save({"encoder": 1}, legacy, _use_new_zipfile_serialization=False)
    not_tutorial = tmp_path / "plain.pt"
    torch.save({"encoder": {"w": torch.zeros(1)}, "decoder": {}}, not_tutorial)
    cases = [(tmp_path / "missing.pt", "no such checkpoint file"), (legacy, "not a PyTorch zip archive"),
             (not_tutorial, "its 'encoder' is not a pickled models.Encoder")]
    for path, reason in cases:
        with pytest.raises(UserError, match=reason) as caught:
            convert_tutorial.read_tutorial_checkpoint(path)
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------
# Packed data


def test_data_converts_to_the_packed_layout_at_the_tutorials_image_size(tmp_path, packed_data):
    word_map = tutorial_word_map(WORDS)
    base = write_tutorial_folder(tmp_path / "tutorial", {"TRAIN": 3, "VAL": 2, "TEST": 2}, word_map, size=256)
    manifest = convert_tutorial.main(["data", "--tutorial-folder", str(tmp_path / "tutorial"),
                                      "--output-folder", str(tmp_path / "out"), "--chunk-images", "2"])
    out = tmp_path / "out"
    assert json.loads((out / "word_map.json").read_text()) == word_map
    words = {i: w for w, i in word_map.items()}
    for split in ("train", "val", "test"):
        source = tmp_path / "tutorial" / f"{split.upper()}_IMAGES_{base}.hdf5"
        captions = json.loads((tmp_path / "tutorial" / f"{split.upper()}_CAPTIONS_{base}.json").read_text())
        lengths = json.loads((tmp_path / "tutorial" / f"{split.upper()}_CAPLENS_{base}.json").read_text())
        with h5py.File(source) as f, h5py.File(out / f"{split}.h5") as g:
            assert np.array_equal(f["images"][:], g["images"][:]) and g["images"].shape[1:] == (3, 256, 256)
            assert g["captions"][:].tolist() == captions and g["lengths"][:].tolist() == lengths
            assert g.attrs["captions_per_image"] == 5
        meta = json.loads((out / f"{split}_meta.json").read_text())["images"]
        assert len(meta) == manifest["images"][split] == len(lengths) // 5
        for i, entry in enumerate(meta):
            assert list(entry) == ["file", "name", "image_id", "objects", "captions", "references"]
            references = [[words[t] for t in captions[r][1:lengths[r] - 1]] for r in range(5 * i, 5 * i + 5)]
            assert entry["references"] == references and entry["captions"] == [" ".join(r) for r in references]
            assert (entry["file"], entry["name"], entry["image_id"], entry["objects"]) == \
                (None, f"{split.upper()}_IMAGES_{base}.hdf5#{i}", i, None)
    packed_keys = json.loads((packed_data / "manifest.json").read_text()).keys()
    assert set(packed_keys) <= manifest.keys() and manifest["converted_from"]["base_name"] == base
    assert (manifest["dataset"], manifest["min_word_freq"], manifest["max_len"], manifest["image_size"]) == \
        ("coco", 5, 12, 256)
    assert len(CaptionDataset(out, "test")) == 2 and len(CaptionDataset(out, "train")) == 15


class RecordingDataset:
    """An HDF5 dataset stand-in that records how many images each read asks for."""

    def __init__(self, images):
        self.images, self.shape, self.reads = images, images.shape, []

    def read_direct(self, buffer, source_sel, dest_sel):
        self.reads.append((source_sel.stop - source_sel.start, buffer.shape[0]))
        buffer[dest_sel] = self.images[source_sel]


def test_images_are_copied_a_chunk_at_a_time(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 8, 8), dtype=np.uint8)
    source = RecordingDataset(images)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        target = f.create_dataset("images", shape=images.shape, dtype="uint8")
        progress = argparse.Namespace(done=0)
        progress.update = lambda n: setattr(progress, "done", progress.done + n)
        convert_tutorial.copy_images(source, target, 3, progress)
        assert np.array_equal(target[:], images) and progress.done == 7
    assert source.reads == [(3, 3), (3, 3), (1, 3)]  # never more than a chunk, into one buffer of a chunk


def test_an_interrupted_conversion_leaves_no_manifest_and_no_half_written_file(tutorial_folder, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "out"
    convert_tutorial.convert_data(tutorial_folder, out)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    copy_images = convert_tutorial.copy_images

    def interrupted_in_test(source, target, chunk_images, progress):
        if source.shape[0] == COUNTS["TEST"]:
            copy_images(source, target, 2, progress)  # part of the split written, then Ctrl-C
            raise KeyboardInterrupt
        copy_images(source, target, chunk_images, progress)

    monkeypatch.setattr(convert_tutorial, "copy_images", interrupted_in_test)
    with pytest.raises(KeyboardInterrupt):
        convert_tutorial.convert_data(tutorial_folder, out)
    assert not (out / "manifest.json").exists() and not list(out.glob(".*partial*"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == finished  # the earlier run's, untouched
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(out)


def test_tutorial_folders_that_do_not_fit_are_refused_naming_the_file(tutorial_folder, tmp_path):
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path))}: no WORDMAP_<base>.json files; pass --base-name"):
        convert_tutorial.convert_data(tmp_path, tmp_path / "out")
    folder = tmp_path / "short"
    base = write_tutorial_folder(folder, {"TRAIN": 2, "VAL": 1, "TEST": 1}, tutorial_word_map(WORDS), size=8)
    lengths_file = folder / f"VAL_CAPLENS_{base}.json"
    lengths_file.write_text(json.dumps(json.loads(lengths_file.read_text())[:-1]))
    with pytest.raises(UserError, match=r"VAL_CAPTIONS_.*: 5 captions and 4 lengths for 1 images x 5 captions"):
        convert_tutorial.convert_data(folder, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # the train split written before was removed


def test_every_flag_of_both_commands_has_a_default_or_is_required_and_a_help_string():
    parser_actions = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parser_actions.append(self)
        return original(self, args, namespace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            convert_tutorial.main([])
    commands = next(a for a in parser_actions[0]._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, f"{name}: {action.option_strings} has no help"
            assert action.required or action.default is not None or action.dest == "base_name"
            assert all(s.startswith("--") and "_" not in s for s in action.option_strings)
