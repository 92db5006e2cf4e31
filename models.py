"""Show, Attend and Tell: a CNN encoder, soft attention and an LSTM decoder.

Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
https://arxiv.org/abs/1502.03044 (the "soft" deterministic attention of section 4.2).

    from models import Encoder, DecoderWithAttention
    encoder = Encoder(arch="resnet101", pretrained=False)
    decoder = DecoderWithAttention(vocab_size=10000, encoder_dim=encoder.encoder_dim)

Dimension legend used in shape comments:
    B batch, K beams, P pixels of the encoder grid, E encoder dim, D decoder dim, A attention dim,
    M embedding dim, T caption steps, V vocabulary.
"""

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from utils import UserError

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RESNET_BLOCKS = ("layer1", "layer2", "layer3", "layer4")

# Channels out of each residual stage: basic blocks (18/34) vs. bottleneck blocks (50/101/152).
_STAGE_CHANNELS = {
    "basic": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "bottleneck": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}


class PretrainedWeightsUnavailable(UserError):
    """ImageNet weights were asked for but could not be downloaded or read."""


def encoder_dim_for(arch, cut_after="layer4"):
    """Number of channels the encoder emits for a ResNet `arch` cut after block `cut_after`."""
    kind = "basic" if arch in ("resnet18", "resnet34") else "bottleneck"
    return _STAGE_CHANNELS[kind][cut_after]


def _build_resnet(arch, pretrained, weights_path, load_weights):
    """A torchvision ResNet with ImageNet weights (downloaded, or read from `weights_path`) or random."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown encoder architecture {arch!r}; choose one of {', '.join(RESNET_ARCHS)}")
    resnet = getattr(torchvision.models, arch)(weights=None)
    if not load_weights:
        return resnet
    if weights_path:
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            resnet.load_state_dict(state)
        except Exception as exc:  # a missing file, a non-torch file, or another model's weights
            raise PretrainedWeightsUnavailable(
                f"cannot load encoder weights from {weights_path}: {str(exc).splitlines()[0]}; "
                f"pass a state dict saved from torchvision.models.{arch}"
            ) from None
    elif pretrained:
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        try:
            resnet.load_state_dict(weights.get_state_dict(progress=True))
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise PretrainedWeightsUnavailable(
                f"could not download the ImageNet weights of {arch} ({exc.__class__.__name__}); "
                "without internet pass --no-pretrained to start from random weights, "
                "or --encoder-weights PATH to read a torchvision state dict from disk"
            ) from None
    return resnet


class Encoder(nn.Module):
    """A ResNet without its pooling and classifier, pooled to an `encoded_size` x `encoded_size` grid.

    Args:
        arch: one of RESNET_ARCHS.
        encoded_size: side of the output grid (adaptive average pooling), 14 in the paper's setup.
        pretrained: load torchvision's ImageNet weights (needs internet or a warm torch hub cache).
        weights_path: a local torchvision state dict for `arch`; overrides `pretrained`.
        fine_tune: train conv blocks 2-4 as in the tutorial; a randomly initialised encoder trains
            all of it, since frozen random filters carry nothing worth keeping.
        cut_after: the last residual block kept ("layer4" is the paper's setup; cutting earlier
            gives a finer, cheaper grid, which the small synthetic demo uses).
        load_weights: False builds the architecture only, for weights that come from a checkpoint
            (`pretrained` and `weights_path` then only say how the encoder was initialised).
    """

    def __init__(self, arch="resnet101", encoded_size=14, pretrained=True, weights_path=None,
                 fine_tune=False, cut_after="layer4", load_weights=True):
        super().__init__()
        if cut_after not in RESNET_BLOCKS:
            raise ValueError(f"cut_after must be one of {', '.join(RESNET_BLOCKS)}, got {cut_after!r}")
        resnet = _build_resnet(arch, pretrained, weights_path, load_weights)
        blocks = [resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool]
        for name in RESNET_BLOCKS[: RESNET_BLOCKS.index(cut_after) + 1]:
            blocks.append(getattr(resnet, name))
        self.resnet = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d((encoded_size, encoded_size))
        self.encoded_size = encoded_size
        self.encoder_dim = encoder_dim_for(arch, cut_after)
        self.random_init = not (pretrained or weights_path)
        self.set_fine_tuning(fine_tune)
        # channels_last: faster convolutions on GPUs and, through oneDNN, on CPUs too (README:
        # Performance). Moving the module to a device or loading weights keeps the layout.
        self.to(memory_format=torch.channels_last)

    def set_fine_tuning(self, fine_tune):
        """Freeze the encoder, or unfreeze conv blocks 2-4 (all of it when randomly initialised)."""
        first_trainable = 0 if self.random_init else 5  # resnet children 5+ are layer2, layer3, layer4
        for index, child in enumerate(self.resnet.children()):
            for param in child.parameters():
                param.requires_grad = fine_tune and index >= first_trainable
        self.train(self.training)

    def train(self, mode=True):
        """Like nn.Module.train, but frozen blocks stay in eval mode so BatchNorm statistics stay put."""
        super().train(mode)
        for child in self.resnet.children():
            if not any(p.requires_grad for p in child.parameters()):
                child.eval()
        return self

    def forward(self, images):
        """images: (B, 3, H, W) float, ImageNet-normalised -> (B, P, E) features, P = encoded_size**2."""
        images = images.contiguous(memory_format=torch.channels_last)  # the weights' layout
        features = self.pool(self.resnet(images))  # (B, E, S, S)
        return features.flatten(2).transpose(1, 2)  # (B, P, E)


class Attention(nn.Module):
    """Additive soft attention (Bahdanau-style), eq. 4-6 of the paper.

    The encoder projection does not depend on the step: the decoder computes it once per batch with
    `project_encoder`. `decoder_att` is applied by the decoder too, stacked with its other maps of
    the hidden state into one matmul (DecoderWithAttention.hidden_weights).
    """

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def project_encoder(self, encoder_out):
        """encoder_out: (B, P, E) -> (B, P, A)."""
        return self.encoder_att(encoder_out)

    def forward(self, encoder_out, encoder_proj, hidden_proj):
        """One attention step for K hidden states per image (K = 1 in training, the beams in beam search).

        Args:
            encoder_out: (N, P, E) float, encoder features.
            encoder_proj: (N, P, A) float, `project_encoder(encoder_out)`.
            hidden_proj: (N*K, A) float, `decoder_att` of the previous hidden states, the K of an
                image consecutive.
        Returns:
            context (N*K, E) float, the attention-weighted encoding, and alpha (N*K, P), summing to 1.
        """
        n, num_pixels, encoder_dim = encoder_out.shape
        hidden_proj = hidden_proj.view(n, -1, encoder_proj.shape[2])  # (N, K, A)
        scores = self._scores(encoder_proj, hidden_proj)  # (N, K, P)
        alpha = scores.softmax(dim=2)  # (N, K, P)
        context = torch.bmm(alpha, encoder_out)  # (N, K, E)
        return context.view(-1, encoder_dim), alpha.view(-1, num_pixels)  # (N*K, E), (N*K, P)

    def _scores(self, encoder_proj, hidden_proj):
        """full_att(relu(encoder_proj + hidden_proj)), eq. 4: (N, P, A) and (N, K, A) -> (N, K, P).

        Decoding on a CPU takes a few images at a time (see _image_chunks). Training does not:
        autograd keeps every chunk's sum for the backward, so the sums stay out of cache anyway.
        Nor does it slice: the backward of even a whole-tensor slice zero-fills a gradient of
        encoder_proj's size and copies into it, at every step.
        """
        if torch.is_grad_enabled():
            return self.full_att(_relu_sum(encoder_proj, hidden_proj)).squeeze(3)  # (N, K, P)
        scores = [self.full_att(_relu_sum(encoder_proj[chunk], hidden_proj[chunk])).squeeze(3)
                  for chunk in _image_chunks(encoder_proj, hidden_proj.shape[1])]  # (n, K, P) each
        return scores[0] if len(scores) == 1 else torch.cat(scores)


# The (n, K, P, A) sum inside the scores is a decoding step's largest tensor (beam 5, 64 images:
# 128 MB). Made and read a few images at a time it stays in a CPU's cache: on 2 cores the scores
# of that step took 6 ms instead of 22. A GPU takes the whole batch at once.
CPU_CHUNK_BYTES = 8 * 2**20


def _image_chunks(encoder_proj, beams):
    """Slices over the N images of encoder_proj (N, P, A) whose (n, K, P, A) sums fit the chunk size."""
    n, num_pixels, attention_dim = encoder_proj.shape
    if encoder_proj.device.type == "cpu":
        per_image = beams * num_pixels * attention_dim * encoder_proj.element_size()
        step = max(1, CPU_CHUNK_BYTES // per_image)
    else:
        step = max(1, n)
    return [slice(i, i + step) for i in range(0, n, step)]


def _relu_sum(encoder_proj, hidden_proj):
    """relu(encoder_proj + hidden_proj): (n, P, A) and (n, K, A) -> (n, K, P, A). The beams of an
    image broadcast against its one projection instead of K copies of it, and relu works in place
    rather than allocating another tensor of the largest size of the step."""
    return (encoder_proj.unsqueeze(1) + hidden_proj.unsqueeze(2)).relu_()


def done_check_schedule(device):
    """How beam search looks for images that are done: (steps between looks, lagged).

    A look reads device flags on the host. On a CPU that costs nothing: it looks every step and acts
    at once. On a GPU a read would make the host wait for the device, so every 8 steps the flags are
    copied to the host in the background and acted on at a later look, once they have arrived
    (lagged): an image leaves some steps after it is done, and the step loop never waits. Acting
    on older flags is sound because a done image stays done: its beams only extend by <end>.
    """
    return (1, False) if device.type == "cpu" else (8, True)


class _DoneLooks:
    """Beam search's looks at which images are done, on the host (see done_check_schedule)."""

    def __init__(self, device):
        self.every, self.lagged = done_check_schedule(device)
        self.in_flight = None  # (flags on their way to the host, CUDA event or None, rows kept since)

    def look(self, done):
        """done: (n,) bool on the device, for the batch as it is now. Returns the done flags (n,) on
        the host for the batch as it is now: these (not lagged), an earlier look's once arrived
        (lagged), or None while none have."""
        if not self.lagged:
            return done.cpu()
        arrived = None
        if self.in_flight is not None:
            flags, event, kept = self.in_flight
            if event is None or event.query():  # query() asks without waiting
                arrived = flags if kept is None else flags[kept]
                self.in_flight = None
        if self.in_flight is None:
            flags, event = done.to("cpu", non_blocking=True), None  # into pinned memory on CUDA
            if done.is_cuda:
                event = torch.cuda.Event()
                event.record()
            self.in_flight = (flags, event, None)
        return arrived

    def keep(self, rows):
        """The batch keeps only `rows` (host long tensor): so do the flags in flight. Called after a
        look that returned flags, which (lagged) leaves in flight a copy of the batch before that."""
        if self.in_flight is not None:
            flags, event, _ = self.in_flight
            self.in_flight = (flags, event, rows)


class _RecurrentLinearFunction(torch.autograd.Function):
    """F.linear for one step of a RecurrentLinear: see there."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, layer):
        ctx.save_for_backward(inputs, weight)
        ctx.layer = layer
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        inputs, weight = ctx.saved_tensors
        layer = ctx.layer
        # Under autocast the step ran in low precision: grad has that dtype, the weight does not.
        grad_input = grad.mm(weight.to(grad.dtype)).to(inputs.dtype) if ctx.needs_input_grad[0] else None
        layer.pending.append((grad, inputs))
        if len(layer.pending) < layer.steps:
            return grad_input, None, None, None
        # The last step to run backward: every step's gradient is in, so the weight's is one matmul.
        # fp16 sums in fp32: the sum over all steps of loss-scaled gradients could overflow fp16.
        dtype = torch.float32 if grad.dtype == torch.float16 else grad.dtype
        grads = torch.cat([g for g, _ in layer.pending]).to(dtype)  # (sum of N_t, out)
        all_inputs = torch.cat([x for _, x in layer.pending]).to(dtype)  # (sum of N_t, in)
        layer.pending.clear()
        grad_weight = grads.t().mm(all_inputs).to(weight.dtype)
        grad_bias = grads.sum(0, dtype=torch.float32).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None


class RecurrentLinear:
    """A linear map applied at every step of a recurrence, whose weight gradient is one matmul.

    Autograd would give every step's weight its own gradient, a rank-N update of the whole matrix
    (N = batch), and sum them: thin matmuls and full-size additions. Here each step's backward only
    passes its input gradient on and keeps (output gradient, input); the last of them computes
    sum_t grad_t^T input_t in one matmul, as cuDNN's RNNs do. On 2 CPU cores this made the decoder's
    forward+backward (bench.py's setting) 1.07x faster. Use one object per forward pass.
    """

    def __init__(self, weight, bias=None):
        self.weight, self.bias = weight, bias
        self.steps = 0  # calls that will run a backward
        self.pending = []  # (output gradient, input) of the steps whose backward has run

    def __call__(self, inputs):
        """inputs: (N, in) -> (N, out)."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(inputs, self.weight, self.bias)
        self.steps += 1
        return _RecurrentLinearFunction.apply(inputs, self.weight, self.bias, self)


class StepMaps(NamedTuple):
    """The linear maps of one decoding pass (DecoderWithAttention.step_maps)."""

    words: Callable  # word indices (...) -> (..., 4D): the words' share of the LSTM gates, with its bias
    hidden: Callable  # h (N, D) -> (N, A + E + 4D): decoder_att, f_beta and the LSTM's hidden-to-gates
    context: Callable  # gated context (N, E) -> (N, 4D): the LSTM's context-to-gates


class DecoderWithAttention(nn.Module):
    """LSTM decoder with soft attention, a gated context and h0/c0 from the mean encoding.

    Args:
        vocab_size: V, from the word map.
        encoder_dim, attention_dim, embed_dim, decoder_dim: E, A, M, D.
        dropout: before the output layer, as in the tutorial.
    """

    def __init__(self, vocab_size, encoder_dim=2048, attention_dim=512, embed_dim=512,
                 decoder_dim=512, dropout=0.5):
        super().__init__()
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.lstm = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # gate on the context, section 4.2.1
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self._init_weights()

    def _init_weights(self):
        """Uniform embeddings and output layer, zero output bias, as in the tutorial."""
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def init_hidden_state(self, encoder_out):
        """encoder_out: (N, P, E) -> h0, c0: (N, D) each, from the mean encoding."""
        mean_encoding = encoder_out.mean(dim=1)  # (N, E)
        return self.init_h(mean_encoding), self.init_c(mean_encoding)

    def hidden_weights(self):
        """The three maps of the previous hidden state, stacked so that a step applies them in one
        matmul: decoder_att (A rows), f_beta (E rows) and the LSTM's hidden-to-gates (4D rows)."""
        weight = torch.cat([self.attention.decoder_att.weight, self.f_beta.weight, self.lstm.weight_hh])
        bias = torch.cat([self.attention.decoder_att.bias, self.f_beta.bias, self.lstm.bias_hh])
        return weight, bias  # (A + E + 4D, D), (A + E + 4D,)

    def step(self, encoder_out, encoder_proj, word_gates, h, c, maps):
        """One decoding step for K hidden states per image of encoder_out (N, P, E).

        Args:
            encoder_proj: (N, P, A), `attention.project_encoder(encoder_out)`.
            word_gates: (N*K, 4D), `maps.words` of the previous words.
            h, c: (N*K, D), the previous LSTM state.
            maps: this pass's StepMaps (see step_maps).
        Returns:
            new h, c (N*K, D) each and alpha (N*K, P).
        """
        attention_dim, encoder_dim = encoder_proj.shape[2], encoder_out.shape[2]
        hidden_proj, gate, hidden_gates = maps.hidden(h).split(
            [attention_dim, encoder_dim, 4 * h.shape[1]], dim=1)  # (N*K, A), (N*K, E), (N*K, 4D)
        context, alpha = self.attention(encoder_out, encoder_proj, hidden_proj)  # (N*K, E), (N*K, P)
        gated_context = torch.sigmoid(gate) * context  # (N*K, E), section 4.2.1
        # nn.LSTMCell's gates (input, forget, cell, output), from their three shares.
        gates = word_gates + maps.context(gated_context) + hidden_gates  # (N*K, 4D)
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        return h, c, alpha

    def step_maps(self):
        """The maps `step` applies, built once per pass (RecurrentLinear: with gradients on, one
        weight gradient over all steps; without, plain F.linear)."""
        # The LSTM's input weight split by what it reads. One split per pass: its backward joins both
        # gradients without zero-filling the whole matrix for each, as two slices would.
        word_weight, context_weight = self.lstm.weight_ih.split(
            [self.embedding.embedding_dim, self.encoder_dim], dim=1)  # (4D, M), (4D, E)
        hidden_weight, hidden_bias = self.hidden_weights()
        return StepMaps(
            # The words' share does not depend on the recurrence; the LSTM's input bias goes here.
            words=lambda words: F.linear(self.embedding(words), word_weight, self.lstm.bias_ih),
            hidden=RecurrentLinear(hidden_weight, hidden_bias),
            context=RecurrentLinear(context_weight))

    def _in_input_order(self, hiddens, alphas, decode_lengths_sorted, order):
        """Scores from the hidden states (B, T, D) of length-sorted captions, and the rows of scores
        and alphas (B, T, P) back in the caller's order.

        The output layer has no recurrence: one matmul over the real steps of all captions instead
        of one per step, and none over padding (in a batch with one long caption, most of (B, T)).
        """
        batch_size, max_steps, _ = hiddens.shape
        steps = torch.arange(max_steps, device=hiddens.device)
        valid = steps.unsqueeze(0) < decode_lengths_sorted.unsqueeze(1)  # (B, T)
        sorted_rows, real_steps = valid.nonzero(as_tuple=True)  # (N,) each, N real steps
        scores = hiddens.new_zeros(batch_size, max_steps, self.vocab_size)  # (B, T, V)
        # Written straight into the caller's rows: unsorting the (B, T, V) scores afterwards would
        # copy them whole, and zero-fill and scatter a gradient as large in the backward.
        scores[order[sorted_rows], real_steps] = self.fc(self.dropout(hiddens[sorted_rows, real_steps]))  # (N, V)
        return scores, alphas[order.argsort()]

    def forward(self, encoder_out, captions, caption_lengths):
        """Teacher-forced decoding.

        Args:
            encoder_out: (B, P, E) float.
            captions: (B, L) long, `<start> w1 ... wn <end> <pad>...`.
            caption_lengths: (B,) long, tokens including `<start>` and `<end>`.
        Returns:
            scores (B, T, V) float for predicting captions[:, 1:T+1] with T = max(decode_lengths)
            (zero at padded steps), alphas (B, T, P) float (zero at padded steps), and
            decode_lengths (B,) long = caption_lengths - 1. Rows stay in the input order.
        """
        batch_size, num_pixels, _ = encoder_out.shape
        decode_lengths = caption_lengths - 1  # (B,)
        max_steps = int(decode_lengths.max())

        # Sorting by length lets step t run only on the captions still going (a prefix of the batch).
        decode_lengths_sorted, order = decode_lengths.sort(descending=True)
        active_per_step = (decode_lengths_sorted.unsqueeze(0) > torch.arange(
            max_steps, device=decode_lengths.device).unsqueeze(1)).sum(1).tolist()  # T ints

        encoder_out = encoder_out.index_select(0, order)  # (B, P, E); a row copy, not indexing per element
        encoder_proj = self.attention.project_encoder(encoder_out)  # (B, P, A), once per batch
        maps = self.step_maps()
        word_gates = maps.words(captions[order, :max_steps])  # (B, T, 4D), once per batch
        h, c = self.init_hidden_state(encoder_out)  # (B, D) each

        hiddens = encoder_out.new_zeros(batch_size, max_steps, h.shape[1])  # (B, T, D)
        alphas = encoder_out.new_zeros(batch_size, max_steps, num_pixels)  # (B, T, P)
        active_out, active_proj = encoder_out, encoder_proj  # rows of the captions still going
        for t, n in enumerate(active_per_step):
            # Slice only when captions end: the backward of every slice of these big tensors writes
            # a zero-filled gradient of the whole, and the first steps all run the whole batch.
            if n < active_out.shape[0]:
                active_out, active_proj = active_out[:n], active_proj[:n]  # (n, P, E), (n, P, A)
            h, c, alpha = self.step(active_out, active_proj, word_gates[:n, t], h[:n], c[:n], maps)
            hiddens[:n, t] = h
            alphas[:n, t] = alpha

        scores, alphas = self._in_input_order(hiddens, alphas, decode_lengths_sorted, order)
        return scores, alphas, decode_lengths

    def _decode_setup(self, encoder_out, beam_size):
        """Shared start of greedy and beam decoding: projections once per image, states per beam.

        The features and their projection stay one per image (B, P, .): every beam of an image reads
        them through broadcasting in Attention.forward, never through K copies.
        Returns the projection (B, P, A), h and c (B*K, D) each, and the StepMaps.
        """
        encoder_proj = self.attention.project_encoder(encoder_out)  # (B, P, A)
        h, c = self.init_hidden_state(encoder_out)  # (B, D) each
        h = h.repeat_interleave(beam_size, dim=0)  # (B*K, D)
        c = c.repeat_interleave(beam_size, dim=0)  # (B*K, D)
        return encoder_proj, h, c, self.step_maps()

    @torch.no_grad()
    def beam_search(self, encoder_out, start_token, end_token, beam_size=3, max_steps=50,
                    return_alphas=False, return_scores=False):
        """Batched beam search: all beams of all images advance as one tensor batch.

        A beam that emits `<end>` is finished: it keeps its score and holds its place among the K
        best, so images finish independently. An image whose K beams have all finished leaves the
        batch, so the images still decoding do not carry it. Decoding stops when every image has
        left or after `max_steps` words. The best finished beam wins (the best unfinished one when
        none finished, so a caption is always returned). Scores are summed log-probabilities, as in
        the tutorial. Beam size 1 is greedy decoding.

        Args:
            encoder_out: (B, P, E) float.
            start_token, end_token: word-map indices of `<start>` and `<end>`.
            beam_size: K.
            max_steps: the most words generated per caption, `<end>` included.
            return_alphas: also return each word's attention map.
            return_scores: also return each caption's summed log-probability (its `<end>` included
                when it finished).
        Returns:
            tokens: list of B lists of word indices, without `<start>` and `<end>`.
            alphas (only with return_alphas): list of B float tensors (len(tokens[i]), P).
            scores (only with return_scores, last): list of B floats.
        """
        # The step loop never waits for the device; the captions are read once, after it.
        tokens, alphas, scores = ([None] * encoder_out.shape[0] for _ in range(3))
        for images, sequences, group_alphas, group_scores in self._beam_search_steps(
                encoder_out, start_token, end_token, beam_size, max_steps, return_alphas):
            group_alphas = group_alphas.cpu() if return_alphas else None  # (m, t, P), one copy per group
            for i, (image, seq, score) in enumerate(zip(images.tolist(), sequences.tolist(),
                                                        group_scores.tolist())):
                length = seq.index(end_token) if end_token in seq else len(seq)
                tokens[image], scores[image] = seq[:length], score
                if return_alphas:
                    # The maps of the words returned; the <end> step's map is dropped with the word.
                    alphas[image] = group_alphas[i, :length]
        outputs = (tokens,) + ((alphas,) if return_alphas else ()) + ((scores,) if return_scores else ())
        return outputs if len(outputs) > 1 else tokens

    def _beam_search_steps(self, encoder_out, start_token, end_token, k, max_steps, return_alphas):
        """beam_search's step loop. Returns a list of (image indices (m,) on the host, their best
        beams (m, t), those beams' maps (m, t, P) or None, and their scores (m,), on the device), a
        group of images each time some leave the batch."""
        batch_size, num_pixels, _ = encoder_out.shape
        device = encoder_out.device
        encoder_proj, h, c, maps = self._decode_setup(encoder_out, k)

        # The state of the n images still decoding, their beams consecutive in the flat (n*K) rows.
        images = torch.arange(batch_size)  # (n,) on the host: their indices in encoder_out
        words = torch.full((batch_size * k,), start_token, dtype=torch.long, device=device)  # (n*K,)
        # Only beam 0 is live at first, so the K beams do not start as K copies of one hypothesis.
        beam_scores = torch.full((batch_size, k), -math.inf, device=device)  # (n, K)
        beam_scores[:, 0] = 0.0
        finished = torch.zeros(batch_size, k, dtype=torch.bool, device=device)  # (n, K)
        sequences = torch.empty(batch_size, k, 0, dtype=torch.long, device=device)  # (n, K, t)
        alpha_history = encoder_out.new_empty(batch_size, k, 0, num_pixels)  # (n, K, t, P)
        first_rows = torch.arange(batch_size, device=device).unsqueeze(1) * k  # (B, 1) each image's first row
        looks = _DoneLooks(device)
        results = []

        for t in range(max_steps):
            n = images.shape[0]
            h, c, alpha = self.step(encoder_out, encoder_proj, maps.words(words), h, c, maps)
            log_probs = F.log_softmax(self.fc(h), dim=1).view(n, k, -1)  # (n, K, V)
            vocab_size = log_probs.shape[2]
            # A finished beam extends only by one dummy <end> that leaves its score unchanged.
            log_probs.masked_fill_(finished.unsqueeze(2), -math.inf)
            log_probs[:, :, end_token].masked_fill_(finished, 0.0)
            candidates = (beam_scores.unsqueeze(2) + log_probs).view(n, -1)  # (n, K*V)
            beam_scores, flat_index = candidates.topk(k, dim=1)  # (n, K)
            parent = flat_index // vocab_size  # (n, K)
            next_words = flat_index % vocab_size  # (n, K)

            rows = (first_rows[:n] + parent).view(-1)  # (n*K,) the parents' rows
            sequences = torch.cat([sequences.gather(1, parent.unsqueeze(2).expand(-1, -1, t)),
                                   next_words.unsqueeze(2)], dim=2)  # (n, K, t+1)
            if return_alphas:
                parent_alphas = alpha_history.gather(1, parent.view(n, k, 1, 1).expand(-1, -1, t, num_pixels))
                new_alphas = alpha[rows].view(n, k, 1, num_pixels)  # each beam's parent's map
                alpha_history = torch.cat([parent_alphas, new_alphas], dim=2)  # (n, K, t+1, P)
            finished = finished.gather(1, parent) | (next_words == end_token)  # (n, K)
            h, c, words = h[rows], c[rows], next_words.view(-1)

            if (t + 1) % looks.every:
                continue
            done = looks.look(finished.all(dim=1))  # (n,) on the host, or None
            if done is None or not done.any():
                continue
            # Host indices go to the device without waiting for it (non_blocking).
            leaving = done.nonzero().squeeze(1).to(device, non_blocking=True)  # (m,)
            results.append((images[done], *self._best_beams(
                sequences[leaving], alpha_history[leaving], beam_scores[leaving], finished[leaving], return_alphas)))
            if done.all():
                return results
            live = (~done).nonzero().squeeze(1)  # (n',) on the host
            looks.keep(live)
            images, live = images[live], live.to(device, non_blocking=True)
            live_rows = (first_rows[live] + torch.arange(k, device=device)).view(-1)  # (n'*K,)
            encoder_out, encoder_proj = encoder_out[live], encoder_proj[live]
            beam_scores, finished, sequences = beam_scores[live], finished[live], sequences[live]
            alpha_history = alpha_history[live]
            h, c, words = h[live_rows], c[live_rows], words[live_rows]
        # max_steps reached: the images still decoding end here.
        results.append((images, *self._best_beams(sequences, alpha_history, beam_scores, finished, return_alphas)))
        return results

    @staticmethod
    def _best_beams(sequences, alpha_history, beam_scores, finished, return_alphas):
        """The best finished beam of each of m images, or the best of all when none finished.

        sequences (m, K, t); alpha_history (m, K, t, P); beam_scores and finished (m, K).
        Returns its words (m, t), with return_alphas its maps (m, t, P) (else None), and its score (m,).
        """
        ranked = torch.where(finished, beam_scores, beam_scores - 1e9)  # (m, K)
        best = ranked.argmax(dim=1)  # (m,)
        rows = torch.arange(best.shape[0], device=best.device)
        return (sequences[rows, best], (alpha_history[rows, best] if return_alphas else None),
                beam_scores[rows, best])

    @torch.no_grad()
    def greedy_decode(self, encoder_out, start_token, end_token, max_steps=50, return_alphas=False,
                      return_scores=False):
        """Greedy decoding: the most likely word at every step. Same inputs and outputs as
        `beam_search`; written separately so that the two can check each other."""
        batch_size = encoder_out.shape[0]
        encoder_proj, h, c, maps = self._decode_setup(encoder_out, 1)
        words = torch.full((batch_size,), start_token, dtype=torch.long, device=encoder_out.device)
        step_words, step_alphas, step_log_probs = [], [], []
        for _ in range(max_steps):
            h, c, alpha = self.step(encoder_out, encoder_proj, maps.words(words), h, c, maps)
            logits = self.fc(h)  # (B, V)
            words = logits.argmax(dim=1)  # (B,)
            step_log_probs.append(F.log_softmax(logits, dim=1).gather(1, words.unsqueeze(1)).squeeze(1))
            step_words.append(words)
            step_alphas.append(alpha)
            if bool((torch.stack(step_words, 1) == end_token).any(1).all()):
                break
        all_words = torch.stack(step_words, dim=1).tolist()  # (B, t)
        all_alphas = torch.stack(step_alphas, dim=1)  # (B, t, P)
        all_log_probs = torch.stack(step_log_probs, dim=1).cpu()  # (B, t)
        tokens, maps, scores = [], [], []
        for i, seq in enumerate(all_words):
            length = seq.index(end_token) if end_token in seq else len(seq)
            tokens.append(seq[:length])
            maps.append(all_alphas[i, :length].cpu())
            scores.append(float(all_log_probs[i, :length + 1].sum()))  # its <end> too, when it ended
        outputs = (tokens,) + ((maps,) if return_alphas else ()) + ((scores,) if return_scores else ())
        return outputs if len(outputs) > 1 else tokens
