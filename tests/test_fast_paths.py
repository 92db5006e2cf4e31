"""The fast paths compute what the plain ones do: the decoder (sorted by length, the attention
projection once per batch, the output layer once after the loop) against the tutorial's per-step
formulation, bench.py's step-loop baseline against the real decoder, packing through shared memory
against packing in one process, and images written to HDF5 as whole chunks against the images."""
import threading

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import create_input_files
import losses
from bench import StepLoopProjectionDecoder
from models import DecoderWithAttention


def tutorial_forward(decoder, encoder_out, captions, caption_lengths):
    """DecoderWithAttention's teacher-forced pass written with its modules one by one, as the
    tutorial does: decoder_att, f_beta and nn.LSTMCell at every step, the output layer per step."""
    decode_lengths = caption_lengths - 1
    batch_size, num_pixels, _ = encoder_out.shape
    steps = int(decode_lengths.max())
    embeddings = decoder.embedding(captions)
    h, c = decoder.init_hidden_state(encoder_out)
    scores = encoder_out.new_zeros(batch_size, steps, decoder.vocab_size)
    alphas = encoder_out.new_zeros(batch_size, steps, num_pixels)
    attention = decoder.attention
    for t in range(steps):
        active = decode_lengths > t  # rows in any order: no sorting here
        proj = attention.encoder_att(encoder_out[active])
        hidden = attention.decoder_att(h[active]).unsqueeze(1)
        alpha = attention.full_att(torch.relu(proj + hidden)).squeeze(2).softmax(dim=1)
        context = (encoder_out[active] * alpha.unsqueeze(2)).sum(dim=1)
        gate = torch.sigmoid(decoder.f_beta(h[active]))
        h_new, c_new = decoder.lstm(torch.cat([embeddings[active, t], gate * context], dim=1),
                                    (h[active], c[active]))
        h, c = h.clone(), c.clone()
        h[active], c[active] = h_new, c_new
        scores[active, t] = decoder.fc(h_new)
        alphas[active, t] = alpha
    return scores, alphas, decode_lengths


DIMS = dict(vocab_size=30, encoder_dim=16, attention_dim=8, embed_dim=6, decoder_dim=10, dropout=0.0)


def teacher_forcing_batch():
    """Features (5, 9, 16) and captions of 5 lengths (<start> 28, <end> 29, <pad> 0) for DIMS."""
    features = torch.randn(5, 9, 16)
    lengths = torch.tensor([4, 11, 7, 7, 3])
    captions = torch.randint(1, 28, (5, 12))
    captions[:, 0] = 28
    for i, n in enumerate(lengths.tolist()):
        captions[i, n - 1], captions[i, n:] = 29, 0
    return features, captions, lengths


def loss_and_gradients(forward, decoder, features, captions, lengths):
    """Scores, alphas, training loss and {name: gradient} of one teacher-forced pass."""
    decoder.zero_grad(set_to_none=True)
    scores, alphas, decode_lengths = forward(features, captions, lengths)
    loss = losses.caption_loss(scores, captions, decode_lengths, alphas, alpha_c=1.0)[0]
    loss.backward()
    return scores, alphas, loss, {n: p.grad.clone() for n, p in decoder.named_parameters()}


def assert_same_pass(fast, reference):
    """Two results of loss_and_gradients agree, and every gradient is non-zero."""
    (scores, alphas, loss, grads), (ref_scores, ref_alphas, ref_loss, ref_grads) = fast, reference
    torch.testing.assert_close(scores, ref_scores)
    torch.testing.assert_close(alphas, ref_alphas)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_decoder_equals_the_tutorial_formulation_in_loss_and_every_gradient():
    torch.manual_seed(0)
    decoder = DecoderWithAttention(**DIMS)
    batch = teacher_forcing_batch()
    assert_same_pass(loss_and_gradients(decoder, decoder, *batch),
                     loss_and_gradients(lambda *a: tutorial_forward(decoder, *a), decoder, *batch))


def encoder_projections(decoder, *batch):
    """How many times one teacher-forced pass applies the encoder's attention projection."""
    calls = []
    hook = decoder.attention.encoder_att.register_forward_hook(lambda *_: calls.append(1))
    decoder(*batch)
    hook.remove()
    return len(calls)


def test_bench_step_loop_baseline_computes_the_same_loss_and_gradients():
    torch.manual_seed(0)
    real = DecoderWithAttention(**DIMS)
    baseline = StepLoopProjectionDecoder(**DIMS)
    baseline.load_state_dict(real.state_dict())
    batch = teacher_forcing_batch()
    assert_same_pass(loss_and_gradients(real, real, *batch), loss_and_gradients(baseline, baseline, *batch))
    # It really is the other loop: the real decoder projects once per batch, the baseline at every step.
    steps = int(batch[2].max()) - 1
    assert encoder_projections(real, *batch) == 1 and encoder_projections(baseline, *batch) == steps


def test_decode_images_in_threads_equals_one_thread_in_input_order(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(23):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(path)
        records.append({"path": path})
    records.insert(9, {"path": tmp_path / "missing.jpg"})

    in_process = list(create_input_files.decode_images(records, 16, workers=0))
    threads = list(create_input_files.decode_images(records, 16, workers=2, batch=3))  # more than in flight
    assert [r[0] for r in threads] == list(range(len(records)))
    for (i, pixels, error), (_, ref_pixels, ref_error) in zip(threads, in_process):
        assert error == ref_error
        assert (pixels is None and ref_pixels is None) or np.array_equal(pixels, ref_pixels), i
    assert "missing.jpg: no such image file" in threads[9][2]

    stopped = create_input_files.decode_images(records, 16, workers=2, batch=3)
    next(stopped), next(stopped)
    stopped.close()  # as when packing stops at a bad image
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]  # no thread left running


@pytest.mark.parametrize("allowed,workers", [({0}, 1), ({1, 4, 5}, 3), (set(range(64)), 8)])
def test_decoding_threads_default_to_the_cpus_the_process_may_use_at_most_8(monkeypatch, allowed, workers):
    # As under `taskset -c 1,4,5` or a cluster job given 3 CPUs of a larger machine.
    monkeypatch.setattr(create_input_files.os, "sched_getaffinity", lambda pid: allowed, raising=False)
    argv = ["--karpathy-json", "x.json", "--image-folder", "images", "--output-folder", "out"]
    assert create_input_files.parse_args(argv).workers == workers


def test_image_chunk_writer_stores_every_image_in_order_and_cuts_to_those_written(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 4, 4), dtype=np.uint8)
    with h5py.File(tmp_path / "images.h5", "w") as f:
        dataset = f.create_dataset("images", shape=(0, 3, 4, 4), maxshape=(None, 3, 4, 4), dtype="uint8",
                                   chunks=(1, 3, 4, 4))
        writer = create_input_files.ImageChunkWriter(dataset, capacity=9)  # 2 images will be skipped
        assert dataset.shape[0] == 9
        for pixels in images:
            writer.add(pixels)
        writer.finish()
        assert dataset.shape[0] == 7
        assert np.array_equal(dataset[:], images)
        # The same chunks as an ordinary write: a dataset written with h5py's usual assignment matches.
        ordinary = f.create_dataset("ordinary", data=images, chunks=(1, 3, 4, 4))
        assert [dataset.id.read_direct_chunk((i, 0, 0, 0)) for i in range(7)] == \
            [ordinary.id.read_direct_chunk((i, 0, 0, 0)) for i in range(7)]


def test_image_chunk_writer_refuses_a_dataset_it_would_write_wrongly(tmp_path):
    with h5py.File(tmp_path / "images.h5", "w") as f:
        for kwargs in ({"chunks": (2, 3, 4, 4)}, {"chunks": (1, 3, 4, 4), "compression": "gzip"},
                       {"chunks": (1, 3, 4, 4), "shuffle": True}):
            dataset = f.create_dataset(f"images{len(f)}", shape=(0, 3, 4, 4), maxshape=(None, 3, 4, 4),
                                       dtype="uint8", **kwargs)
            with pytest.raises(ValueError, match="one image a chunk"):
                create_input_files.ImageChunkWriter(dataset, capacity=1)
