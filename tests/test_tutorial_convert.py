"""convert_tutorial.py: the tutorial's checkpoints (read without running what they name), as PyTorch
0.4 wrote them and saved again as zip archives, and its packed folders, written here in the
tutorial's layout at tiny sizes (and once at full ResNet-101 size), into this repo's formats."""
import argparse
import errno
import io
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import app
import caption
import convert_tutorial
import eval as evaluate_script
import safe_unpickle
import train
from checkpoints import build_models, load_checkpoint
from datasets import CaptionDataset, decode_tokens, read_manifest
from tutorial_layout import DecoderWithAttention as TutorialDecoder
from tutorial_layout import Encoder as TutorialEncoder
from tutorial_layout import (save_tutorial_checkpoint, save_tutorial_checkpoint_04, tutorial_beam_search,
                             tutorial_modules, tutorial_optimizers, tutorial_word_map, write_tutorial_folder)
from utils import UserError, normalize_images

# The tutorial's model at a tiny size: the whole ResNet up to layer4, as its encoder is, but ResNet-18
# on 64x64 images pooled to a 4x4 grid.
ARCH, IMAGE_SIZE = "resnet18", 64
TINY = {"encoder_arch": "resnet18", "encoder_cut_after": "layer4", "encoded_size": 4, "attention_dim": 32,
        "embed_dim": 16, "decoder_dim": 32, "dropout": 0.5, "pretrained": False, "encoder_weights": None,
        "fine_tune_encoder": False}
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "small", "large"]
COUNTS = {"TRAIN": 6, "VAL": 3, "TEST": 5}
# The tutorial's checkpoint as PyTorch 0.4 wrote it (the released model's format), and saved again
# as a zip archive by a later PyTorch.
SAVERS = {"torch0.4": save_tutorial_checkpoint_04, "zip": save_tutorial_checkpoint}
RELEASED_CHECKPOINT = "BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar"
RELEASED_WORD_MAP = "WORDMAP_coco_5_cap_per_img_5_min_word_freq.json"


def tiny_models(seed=0, vocab_size=len(WORDS) + 4):
    """This repo's encoder and decoder at TINY sizes, randomly initialised from `seed`."""
    torch.manual_seed(seed)
    return build_models(TINY, vocab_size)


def end_captions_after_a_few_words(decoder, end, unit=0):
    """Make random weights finish their captions, as a trained model's do, so that the tutorial's
    search (which returns only finished ones) has captions to compare: hidden unit `unit` counts the
    steps (its gates open, its input a constant 0.1, so h = tanh(0.1 * t)), and <end>'s score is
    20 h - 12, likely from the sixth word or so on, sooner or later as the other words' scores vary."""
    lstm, size = decoder.lstm, decoder.lstm.hidden_size
    with torch.no_grad():
        for gate in range(4):  # input, forget, cell, output
            row = gate * size + unit
            lstm.weight_ih[row], lstm.weight_hh[row], lstm.bias_hh[row] = 0.0, 0.0, 0.0
            lstm.bias_ih[row] = 0.1 if gate == 2 else 10.0
        decoder.init_c.weight[unit], decoder.init_c.bias[unit] = 0.0, 0.0
        decoder.fc.weight[end] = 0.0
        decoder.fc.weight[end, unit], decoder.fc.bias[end] = 20.0, -12.0


def tutorial_checkpoint(path, encoder, decoder, fine_tune=True, decoder_lr=4e-4 * 0.8, saved_as="torch0.4", **extra):
    """`encoder` and `decoder` saved as the tutorial saves them, with Adam state, in the format
    `saved_as` names (a key of SAVERS); returns its modules and optimisers."""
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune)
    optimizers = tutorial_optimizers(*modules, decoder_lr=decoder_lr)
    SAVERS[saved_as](path, *modules, *optimizers, **extra)
    return modules, optimizers


@pytest.fixture(scope="module")
def tutorial_folder(tmp_path_factory):
    """A tutorial packed folder of 64x64 images (the tutorial's are 256x256; layout as it writes it)."""
    folder = tmp_path_factory.mktemp("tutorial")
    write_tutorial_folder(folder, COUNTS, tutorial_word_map(WORDS), size=IMAGE_SIZE)
    return folder


@pytest.fixture(scope="module")
def converted_data(tutorial_folder, tmp_path_factory):
    """tutorial_folder converted by the command line's `data`."""
    out = tmp_path_factory.mktemp("converted_data")
    convert_tutorial.main(["data", "--tutorial-folder", str(tutorial_folder), "--output-folder", str(out)])
    return out


@pytest.fixture(scope="module", params=list(SAVERS))
def converted(request, converted_data, tmp_path_factory):
    """A tiny model's tutorial checkpoint, in each format of SAVERS, converted by the command line's
    `checkpoint`; with the original models and the converted data."""
    out = tmp_path_factory.mktemp("converted")
    encoder, decoder = tiny_models()
    end_captions_after_a_few_words(decoder, tutorial_word_map(WORDS)["<end>"])
    path = out / RELEASED_CHECKPOINT
    modules, optimizers = tutorial_checkpoint(path, encoder, decoder, saved_as=request.param)
    convert_tutorial.main(["checkpoint", "--checkpoint", str(path), "--word-map", str(converted_data / "word_map.json"),
                           "--output", str(out / "converted.pt"), "--image-size", str(IMAGE_SIZE)])
    return {"folder": out, "data": converted_data, "checkpoint": out / "converted.pt", "encoder": encoder,
            "decoder": decoder, "tutorial_modules": modules, "tutorial_optimizers": optimizers}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_eval_caption_and_app_on_converted_files_caption_as_the_tutorials_own_search(converted, tutorial_folder,
                                                                                      tmp_path):
    out = tmp_path / "eval"
    evaluate_script.main(["--checkpoint", str(converted["checkpoint"]), "--data-folder", str(converted["data"]),
                          "--split", "test", "--beam-size", "3", "--max-steps", "12", "--output-dir", str(out),
                          "--workers", "0", "--no-coco-metrics", "--device", "cpu"])
    from_eval = [c["caption"] for c in json.loads((out / "captions_test_beam3.json").read_text())]

    # The tutorial's own search on its own modules, on the images as the tutorial's file holds them.
    tutorial_encoder, tutorial_decoder = (module.eval() for module in converted["tutorial_modules"])
    word_map = tutorial_word_map(WORDS)
    words = {i: w for w, i in word_map.items()}
    with h5py.File(tutorial_folder / "TEST_IMAGES_coco_5_cap_per_img_5_min_word_freq.hdf5") as f:
        pixels = f["images"][:]
    with torch.no_grad():
        tokens = [tutorial_beam_search(tutorial_encoder, tutorial_decoder, image, word_map["<start>"],
                                       word_map["<end>"], beam_size=3, max_steps=12)
                  for image in normalize_images(torch.from_numpy(pixels))]
    expected = {i: " ".join(decode_tokens(t, words)) for i, t in enumerate(tokens) if t is not None}
    assert len(expected) >= 3, "the tutorial's search finished too few captions for the comparison to mean much"
    assert len(set(expected.values())) > 1, "every image got the same caption: images mixed up would pass"
    assert {i: from_eval[i] for i in expected} == expected

    # caption.py on a folder of those images saved as files (at the packed size, so not resampled),
    # and app.py's page on each.
    for i in expected:
        Image.fromarray(pixels[i].transpose(1, 2, 0)).save(tmp_path / f"photo{i}.png")
    from_caption = caption.main(["--img", str(tmp_path), "--checkpoint", str(converted["checkpoint"]),
                                 "--beam-size", "3", "--max-steps", "12", "--device", "cpu"])
    assert {int(path.stem[5:]): " ".join(w) for path, w in from_caption} == expected
    page = app.Captioner(converted["checkpoint"], torch.device("cpu"), max_steps=12)
    assert {i: page.caption(tmp_path / f"photo{i}.png", 3).caption for i in expected} == expected


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


def test_train_resume_fine_tunes_the_encoder_of_a_converted_frozen_checkpoint(converted_data, tmp_path):
    encoder, decoder = tiny_models(seed=1)
    tutorial_checkpoint(tmp_path / "frozen.pth.tar", encoder, decoder, fine_tune=False)
    convert_tutorial.main(["checkpoint", "--checkpoint", str(tmp_path / "frozen.pth.tar"), "--word-map",
                           str(converted_data / "word_map.json"), "--output", str(tmp_path / "frozen.pt"),
                           "--image-size", str(IMAGE_SIZE)])
    assert load_checkpoint(tmp_path / "frozen.pt")["args"]["fine_tune_encoder"] is False
    run = tmp_path / "run"
    train.main(["--data-folder", str(converted_data), "--output-dir", str(run), "--resume",
                str(tmp_path / "frozen.pt"), "--epochs", "5", "--fine-tune-encoder", "--encoder-arch", "resnet18",
                "--encoded-size", "4", "--attention-dim", "32", "--embed-dim", "16", "--decoder-dim", "32",
                "--workers", "0", "--batch-size", "16", "--device", "cpu"])
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["args"]["fine_tune_encoder"] is True and state["history"][0]["encoder_lr"] == pytest.approx(1e-4)
    before = encoder.state_dict()
    assert not torch.equal(state["encoder"]["resnet.5.0.conv1.weight"], before["resnet.5.0.conv1.weight"])
    assert torch.equal(state["encoder"]["resnet.4.0.conv1.weight"], before["resnet.4.0.conv1.weight"])  # block 1


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


@pytest.mark.parametrize("trained, parts", [(slice(4, None), "layer1, layer2, layer3, layer4"),
                                             (slice(7, None), "layer4")])
def test_an_encoder_that_trained_other_blocks_converts_with_a_note(trained, parts, tmp_path):
    # A user who edited the tutorial's fine_tune(): all four residual stages trainable, or the last alone.
    encoder, decoder = tiny_models()
    tutorial_encoder, tutorial_decoder = tutorial_modules(encoder, decoder, ARCH, fine_tune=False)
    for block in list(tutorial_encoder.resnet.children())[trained]:
        block.requires_grad_(True)
    encoder_optimizer, decoder_optimizer = tutorial_optimizers(tutorial_encoder, tutorial_decoder)
    save_tutorial_checkpoint_04(tmp_path / "t.pth.tar", tutorial_encoder, tutorial_decoder, encoder_optimizer,
                                decoder_optimizer)
    state, notes = convert_tutorial.convert_checkpoint(tmp_path / "t.pth.tar", tutorial_word_map(WORDS), IMAGE_SIZE)
    assert notes[0] == (f"its encoder trained {parts} rather than layer2, layer3, layer4 as the tutorial's "
                        "fine_tune() sets; the weights are converted as they are, and train.py --resume "
                        "--fine-tune-encoder trains layer2, layer3, layer4")
    assert state["args"]["fine_tune_encoder"] is True
    assert all(torch.equal(state["encoder"][k], v) for k, v in encoder.state_dict().items())
    # The moments of the tensors both train carry over; the others start afresh, and a note says how many.
    ours, _ = build_models(state["args"], len(state["word_map"]), load_weights=False)
    tuned = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    originals = dict(tutorial_encoder.named_parameters())
    saved = state["encoder_optimizer"]["state"]
    for index, (name, _) in enumerate(tuned):
        if originals[name].requires_grad:
            assert torch.equal(saved[index]["exp_avg"], encoder_optimizer.state[originals[name]]["exp_avg"])
        else:
            assert index not in saved
    fresh = sum(not originals[name].requires_grad for name, _ in tuned)
    assert (fresh > 0) is (parts == "layer4")
    assert notes[1:] == ([f"the encoder's optimiser keeps its moment estimates but for {fresh} tensors it did not "
                          "train, which start afresh"] if fresh else [])


def test_a_legacy_file_a_later_pytorch_wrote_converts_too(tmp_path):
    # PyTorch 1.0-1.5 kept the legacy format, with Parameters rebuilt by torch._utils._rebuild_parameter.
    encoder, decoder = tiny_models()
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune=True)
    save_tutorial_checkpoint(tmp_path / "t.pth.tar", *modules, *tutorial_optimizers(*modules), zip_archive=False)
    assert safe_unpickle.is_legacy_file(tmp_path / "t.pth.tar")
    assert "torch._utils._rebuild_parameter" in safe_unpickle.pickled_globals(tmp_path / "t.pth.tar")
    state, notes = convert_tutorial.convert_checkpoint(tmp_path / "t.pth.tar", tutorial_word_map(WORDS), IMAGE_SIZE)
    assert notes == [] and state["args"]["fine_tune_encoder"] is True
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        assert all(torch.equal(state[name][k], v) for k, v in module.state_dict().items())


def test_an_optimiser_that_does_not_map_restarts_and_says_so(tmp_path):
    encoder, decoder = tiny_models()
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune=False)
    _, decoder_optimizer = tutorial_optimizers(*modules)
    decoder_optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})  # a group of its own
    save_tutorial_checkpoint(tmp_path / "t.pth.tar", *modules, None, decoder_optimizer)
    state, notes = convert_tutorial.convert_checkpoint(tmp_path / "t.pth.tar", tutorial_word_map(WORDS), IMAGE_SIZE)
    assert notes == ["the decoder's optimiser state restarts: it is not one Adam parameter group"]
    assert state["decoder_optimizer"]["state"] == {} and state["decoder_optimizer"]["param_groups"][0]["lr"] == 4e-4


class Payload:
    """Unpickling this calls `function` on `args`; each payload below would create the file `marker`."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


PAYLOADS = {  # name the refusal gives -> the payload, given the marker file's path
    f"{os.system.__module__}.system": lambda marker: Payload(os.system, f"touch {marker}"),
    "builtins.eval": lambda marker: Payload(eval, f"open({str(marker)!r}, 'w').write('ran')"),
    "subprocess.Popen": lambda marker: Payload(subprocess.Popen, ["touch", str(marker)]),
    "builtins.exec": lambda marker: Payload(exec, f"open({str(marker)!r}, 'w').write('ran')"),
}


@pytest.mark.parametrize("named", list(PAYLOADS))
@pytest.mark.parametrize("saved_as", list(SAVERS))
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_does_not_run(saved_as, named, tmp_path):
    encoder, decoder = tiny_models()
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth.tar"
    tutorial_checkpoint(path, encoder, decoder, saved_as=saved_as, **{"bleu-4": PAYLOADS[named](marker)})
    with pytest.raises(UserError, match=rf"refusing to unpickle {re.escape(named)}, ") as caught:
        convert_tutorial.main(["checkpoint", "--checkpoint", str(path), "--word-map", str(write_word_map(tmp_path)),
                               "--output", str(tmp_path / "out.pt")])
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message and "do not open it with torch.load" in message
    # caption.py, eval.py, app.py and train.py read checkpoints through load_checkpoint, which unpickles
    # nothing of it either (it points to the converter, which refuses it as above).
    with pytest.raises(UserError, match="convert_tutorial.py checkpoint"):
        load_checkpoint(path)
    time.sleep(0.2)  # a Popen'd `touch` would have had time to run
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_the_legacy_reader_resolves_nothing_but_its_allow_list_even_unscanned(tmp_path):
    encoder, decoder = tiny_models()
    marker = tmp_path / "code_ran"
    path = tutorial_checkpoint(tmp_path / "evil.pth.tar", encoder, decoder, **{"bleu-4": Payload(os.system,
                                                                                                  f"touch {marker}")})
    with pytest.raises(pickle.UnpicklingError, match=rf"refusing to unpickle {os.system.__module__}\.system"):
        safe_unpickle.load_legacy(tmp_path / "evil.pth.tar", convert_tutorial.ALLOWED)
    assert not marker.exists() and path is not None


def test_a_global_pushed_by_stack_global_is_named_or_refused(tmp_path):
    # Protocol 4 names globals by STACK_GLOBAL, from two strings pushed before it, or fetched from the memo.
    marker = tmp_path / "code_ran"
    torch.save({"encoder": Payload(os.system, f"touch {marker}")}, tmp_path / "p4.pt", pickle_protocol=4)
    assert f"{os.system.__module__}.system" in safe_unpickle.pickled_globals(tmp_path / "p4.pt")
    # By hand: "os" stored in the memo and popped, fetched again, then "system" (pickle opcodes PROTO 4,
    # SHORT_BINUNICODE, BINPUT, POP, BINGET, SHORT_BINUNICODE, STACK_GLOBAL, STOP).
    from_memo = b"\x80\x04\x8c\x02osq\x000h\x00\x8c\x06system\x93."
    assert safe_unpickle.globals_in_pickle(io.BytesIO(from_memo)) == {"os.system"}
    # Operands that are not two strings pushed just before are reported, not skipped.
    untraced = b"\x80\x04\x8c\x02os\x8c\x06system\x85\x93."  # "system" wrapped in a tuple (TUPLE1)
    assert safe_unpickle.globals_in_pickle(io.BytesIO(untraced)) == {"an unnamed global"}
    assert not marker.exists()


def test_the_released_models_sizes_as_pytorch_0_4_wrote_them_from_a_gpu_convert_on_a_cpu(tmp_path):
    # The released model's architecture (ResNet-101 encoder to a 14x14 grid; attention, embedding and
    # LSTM 512 wide) with random weights and a small vocabulary; the encoder frozen, the tutorial's
    # default, so that its optimiser is None.
    torch.manual_seed(0)
    word_map = tutorial_word_map(WORDS)
    encoder = TutorialEncoder(14, "resnet101")
    encoder.fine_tune(False)
    decoder = TutorialDecoder(512, 512, 512, len(word_map))
    encoder.eval(), decoder.eval()  # the tutorial saves its best checkpoint right after validating
    encoder_optimizer, decoder_optimizer = tutorial_optimizers(encoder, decoder)
    path = save_tutorial_checkpoint_04(tmp_path / RELEASED_CHECKPOINT, encoder, decoder, encoder_optimizer,
                                       decoder_optimizer, epoch=27, bleu4=0.33)
    names = safe_unpickle.pickled_globals(path)
    assert safe_unpickle.is_legacy_file(path) and encoder_optimizer is None
    assert {"torch.cuda.FloatStorage", "torch.nn.backends.thnn._get_thnn_function_backend"} <= names
    (tmp_path / RELEASED_WORD_MAP).write_text(json.dumps(word_map))

    convert_tutorial.main(["checkpoint", "--checkpoint", str(path), "--word-map", str(tmp_path / RELEASED_WORD_MAP),
                           "--output", str(tmp_path / "best.pt")])
    state = load_checkpoint(tmp_path / "best.pt")
    assert {k: state["args"][k] for k in ("encoder_arch", "encoder_cut_after", "encoded_size", "attention_dim",
                                          "embed_dim", "decoder_dim", "fine_tune_encoder")} == \
        {"encoder_arch": "resnet101", "encoder_cut_after": "layer4", "encoded_size": 14, "attention_dim": 512,
         "embed_dim": 512, "decoder_dim": 512, "fine_tune_encoder": False}
    assert state["epoch"] == 28 and state["encoder_optimizer"] is None
    weights = encoder.state_dict()  # its batch-norm counters are 0, as the converter sets those 0.4.0 lacks
    assert state["encoder"].keys() == weights.keys()
    assert all(torch.equal(state["encoder"][k], v) for k, v in weights.items())
    ours = {tutorial_name(k): v for k, v in decoder.state_dict().items()}
    assert state["decoder"].keys() == ours.keys()
    assert all(torch.equal(state["decoder"][k], v) for k, v in ours.items())
    fc = [name for name, p in decoder.named_parameters()].index("fc.weight")
    assert torch.equal(state["decoder_optimizer"]["state"][fc]["exp_avg"],
                       decoder_optimizer.state[decoder.fc.weight]["exp_avg"])


@pytest.mark.parametrize("batches_tracked", [False, True])
def test_batch_norm_counters_are_kept_from_0_4_1_and_start_at_zero_from_0_4_0(batches_tracked, tmp_path):
    encoder, decoder = tiny_models()
    modules = tutorial_modules(encoder, decoder, ARCH, fine_tune=False)
    modules[0].resnet[1].num_batches_tracked.fill_(7)
    save_tutorial_checkpoint_04(tmp_path / "t.pth.tar", *modules, None, tutorial_optimizers(*modules)[1],
                                batches_tracked=batches_tracked)
    state, _ = convert_tutorial.convert_checkpoint(tmp_path / "t.pth.tar", tutorial_word_map(WORDS), IMAGE_SIZE)
    assert int(state["encoder"]["resnet.1.num_batches_tracked"]) == (7 if batches_tracked else 0)


@pytest.mark.parametrize("saved_as", list(SAVERS))
def test_the_scripts_given_a_tutorial_checkpoint_print_the_command_that_converts_it(saved_as, packed_data, tmp_path):
    folder = tmp_path / "caption data"  # the tutorial's folder name, with its space
    folder.mkdir()
    path = folder / RELEASED_CHECKPOINT
    encoder, decoder = tiny_models()
    tutorial_checkpoint(path, encoder, decoder, saved_as=saved_as)
    (folder / RELEASED_WORD_MAP).write_text(json.dumps(tutorial_word_map(WORDS)))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "photo.png")
    converted_path = folder / "BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pt"
    command = (f"python convert_tutorial.py checkpoint --checkpoint '{path}' --word-map '{folder / RELEASED_WORD_MAP}' "
               f"--output '{converted_path}'")
    runs = {
        "caption.py": lambda: caption.main(["--img", str(tmp_path / "photo.png"), "--checkpoint", str(path),
                                            "--device", "cpu"]),
        "eval.py": lambda: evaluate_script.main(["--checkpoint", str(path), "--data-folder", str(packed_data),
                                                 "--output-dir", str(tmp_path / "eval"), "--workers", "0",
                                                 "--no-coco-metrics", "--device", "cpu"]),
        "app.py": lambda: app.Captioner(path, torch.device("cpu")),
        "train.py --resume": lambda: train.main(["--data-folder", str(packed_data), "--output-dir",
                                                 str(tmp_path / "run"), "--resume", str(path), "--workers", "0",
                                                 "--device", "cpu"]),
    }
    for script, run in runs.items():
        with pytest.raises(UserError) as caught:
            run()
        message = str(caught.value)
        assert message.startswith(f"{path}: a checkpoint of the PyTorch tutorial"), script
        assert f"run `{command}` and pass the .pt file it writes instead" in message and "\n" not in message, script
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run").exists()

    # As a user sees it: one line, no traceback.
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "caption.py"), "--img", str(tmp_path / "photo.png"),
                             "--checkpoint", str(path), "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"caption.py: error: {message}"]

    # The command works as printed, and caption.py then reads what it wrote.
    assert convert_tutorial.main(shlex.split(command)[2:])["args"]["encoder_arch"] == ARCH
    [(captioned, _)] = caption.main(["--img", str(tmp_path / "photo.png"), "--checkpoint", str(converted_path),
                                     "--device", "cpu", "--max-steps", "5"])
    assert captioned == tmp_path / "photo.png"


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


def test_other_files_are_refused_in_one_sentence_that_says_what_to_convert(tmp_path):
    legacy = tmp_path / "legacy.pth.tar"
    torch.save({"encoder": 1}, legacy, _use_new_zipfile_serialization=False)
    not_tutorial = tmp_path / "plain.pt"
    torch.save({"encoder": {"w": torch.zeros(1)}, "decoder": {}}, not_tutorial)
    random_bytes = tmp_path / "random.pth.tar"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    cut_short = tmp_path / "cut.pth.tar"
    encoder, decoder = tiny_models()
    tutorial_checkpoint(cut_short, encoder, decoder)
    cut_short.write_bytes(cut_short.read_bytes()[:-1000])  # an interrupted download
    cases = [(tmp_path / "missing.pt", "no such checkpoint file"),
             (legacy, "no 'encoder' and 'decoder' entries, so not a tutorial checkpoint"),
             (random_bytes, r"not a checkpoint torch.save wrote \(neither a zip archive nor torch.save's legacy"),
             (cut_short, r"cannot be read safely \(storage .* is cut short"),
             (not_tutorial, "its 'encoder' is not a pickled models.Encoder")]
    for path, reason in cases:
        with pytest.raises(UserError, match=reason) as caught:
            convert_tutorial.read_tutorial_checkpoint(path)
        message = str(caught.value)
        assert message.startswith(str(path)) and "\n" not in message
        assert message.endswith(convert_tutorial.FROM_THE_TUTORIAL)  # what to do next
        # Never the advice to unpickle it with full trust to get past the check.
        assert "weights_only=False" not in message and "save it again" not in message


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


def test_a_disk_that_fills_at_the_meta_files_leaves_one_sentence_and_no_partial_file(tutorial_folder, tmp_path,
                                                                                    monkeypatch):
    def full(folder, split, entries):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_tutorial, "write_meta", full)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="disk filled up"):
        convert_tutorial.convert_data(tutorial_folder, out)
    assert list(out.iterdir()) == []  # no partial file left taking the space


def test_tutorial_folders_that_do_not_fit_are_refused_naming_the_folder_and_the_files(tutorial_folder, tmp_path):
    looked_for = ("WORDMAP_<base>.json, {TRAIN,VAL,TEST}_IMAGES_<base>.hdf5, {TRAIN,VAL,TEST}_CAPTIONS_<base>.json "
                  "and {TRAIN,VAL,TEST}_CAPLENS_<base>.json")
    next_step = "pass --tutorial-folder the output_folder the tutorial's create_input_files.py wrote them into"
    out = ["--output-folder", str(tmp_path / "out")]
    cases = [(tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such folder, so none of the tutorial's {looked_for}; "
                                    f"{next_step}"),
             (tmp_path, f"{tmp_path}: no WORDMAP_<base>.json files of the tutorial's {looked_for}; {next_step}, "
                        "and --base-name to say which <base> if there are several")]
    for folder, message in cases:
        with pytest.raises(UserError) as caught:
            convert_tutorial.main(["data", "--tutorial-folder", str(folder), *out])
        assert str(caught.value) == message
    # The right folder with another --base-name: every file of that name is listed.
    listed = (r"no WORDMAP_coco_1\.json, TRAIN_IMAGES_coco_1\.hdf5, TRAIN_CAPTIONS_coco_1\.json, .*TEST_CAPLENS_"
              r"coco_1\.json \(looked for WORDMAP_coco_1\.json, .*\); pass --tutorial-folder")
    with pytest.raises(UserError, match=rf"{re.escape(str(tutorial_folder))}: {listed}"):
        convert_tutorial.main(["data", "--tutorial-folder", str(tutorial_folder), "--base-name", "coco_1", *out])
    assert not (tmp_path / "out").exists()
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
