"""Show, Attend and Tell: a CNN encoder, soft or hard attention and an LSTM decoder.

Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
https://arxiv.org/abs/1502.03044: the "soft" deterministic attention of section 4.2 (the default), the
"hard" stochastic attention of section 4.1, and the output layer from h_t alone (the tutorial's) or
the paper's deep output layer (eq. 7).

    from models import Encoder, DecoderWithAttention
    encoder = Encoder(arch="resnet101", pretrained=False)
    decoder = DecoderWithAttention(vocab_size=10000, encoder_dim=encoder.encoder_dim)

Dimension legend used in shape comments:
    B batch (B_t: the captions still going at step t), K beams, P pixels of the encoder grid,
    E encoder dim, D decoder dim, A attention dim, M embedding dim, T caption steps, V vocabulary.
"""

from typing import NamedTuple, Optional

import torch
import torchvision
from torch import nn

from beam_search import MAX_STEPS, beam_search, greedy_decode
from utils import UserError

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RESNET_BLOCKS = ("layer1", "layer2", "layer3", "layer4")
ATTENTION_TYPES = ("soft", "hard")  # section 4.2 (the expectation of the features), 4.1 (one sampled cell)
OUTPUT_LAYERS = ("linear", "deep")  # fc(h_t), the tutorial's; eq. 7 from the word, h_t and the context
HARD_READS = ("argmax", "expectation")  # what a hard model reads when it is not training

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
        # channels_last: faster convolutions on GPUs and, through oneDNN, on CPUs too (docs/performance.md).
        # Moving the module to a device or loading weights keeps the layout.
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
    """Soft attention over the P pixels of the encoder grid, eq. 4-6 of the paper:

        e_ti = full_att(relu(encoder_att(a_i) + decoder_att(h_t-1)))   eq. 4, an additive score
        alpha_t = softmax(e_t) over the P pixels                        eq. 5
        z_t = sum_i alpha_ti * a_i                                     eq. 6, the "soft" expectation

    encoder_att(a) does not depend on the step, so the decoder computes it once per batch
    (`DecoderWithAttention.project_encoder`) and every step passes it in.
    """

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU(inplace=True)  # in place: its input is a step's largest tensor, (B, K, P, A)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, encoder_out, encoder_proj, decoder_hidden):
        """One attention step for K hidden states per image (K = 1 in training, the beams in beam search).

        Args:
            encoder_out: (B, P, E) float, the features a_i.
            encoder_proj: (B, P, A) float, `encoder_att(encoder_out)`.
            decoder_hidden: (B*K, D) float, the previous hidden states, the K of an image consecutive.
        Returns:
            context (B*K, E) float, the attention-weighted encoding z_t, and alpha (B*K, P) float,
            summing to 1 over the pixels.
        """
        batch_size, num_pixels, encoder_dim = encoder_out.shape
        hidden_proj = self.decoder_att(decoder_hidden)  # (B*K, A)
        hidden_proj = hidden_proj.view(batch_size, -1, 1, hidden_proj.shape[1])  # (B, K, 1, A)
        # The K beams of an image broadcast against its one projection instead of K copies of it.
        e = self.full_att(self.relu(encoder_proj.unsqueeze(1) + hidden_proj)).squeeze(3)  # (B, K, P)
        alpha = self.softmax(e)  # (B, K, P)
        context = torch.bmm(alpha, encoder_out)  # (B, K, E)
        return context.view(-1, encoder_dim), alpha.view(-1, num_pixels)  # (B*K, E), (B*K, P)


def decoding_order(decode_lengths, per_image):
    """The order teacher forcing runs the captions in, n images of K = per_image consecutive captions.

    An image's K captions step together until its longest ends. Sorted by that length, the images
    still going at step t are the first n_t, and their captions the first n_t * K rows.
    decode_lengths: (B,) long, B = n * K. Returns image_order (n,), order (B,) (the caption rows in
    decoding order), real (B, T) bool (False at a caption's padded steps, T = the longest) and the
    T ints n_t (read to the host once, not at every step).
    """
    image_lengths, image_order = decode_lengths.view(-1, per_image).amax(dim=1).sort(descending=True)  # (n,)
    first_rows = image_order.unsqueeze(1) * per_image  # (n, 1): each image's first caption row
    order = (first_rows + torch.arange(per_image, device=decode_lengths.device)).view(-1)  # (B,)
    steps = torch.arange(int(image_lengths[0]), device=decode_lengths.device)  # (T,)
    real = steps < decode_lengths[order].unsqueeze(1)  # (B, T)
    return image_order, order, real, (steps < image_lengths.unsqueeze(1)).sum(0).tolist()


class Step(NamedTuple):
    """What one decoding step gives: the new LSTM state h, c (B*K, D), the attention weights alpha
    (B*K, P), the gated context the LSTM read (B*K, E), and with hard attention the cell it read
    (B*K,) long, -1 where it read the expectation (None with soft attention)."""

    h: torch.Tensor
    c: torch.Tensor
    alpha: torch.Tensor
    context: torch.Tensor
    location: Optional[torch.Tensor]


class DecoderWithAttention(nn.Module):
    """LSTM decoder with soft or hard attention, a gated context and h0/c0 from the mean encoding.

    Args:
        vocab_size: V, from the word map.
        encoder_dim, attention_dim, embed_dim, decoder_dim: E, A, M, D.
        dropout: before the output layer, as in the tutorial (the deep output layer also drops its
            hidden layer, as the paper's code does).
        attention: "soft" (section 4.2: the context is the expectation of the features) or "hard"
            (section 4.1: the context is the feature vector of one cell, sampled in training).
        output_layer: "linear" (the tutorial's fc(h_t)) or "deep" (eq. 7 of the paper).
        hard_expectation_prob: hard attention in training: the chance that a caption reads the
            expectation (the soft context) instead of sampled cells, 0.5 in the paper (section 4.1).

    `hard_read` ("argmax" or "expectation", attribute) is what a hard model reads when not training.
    """

    def __init__(self, vocab_size, encoder_dim=2048, attention_dim=512, embed_dim=512,
                 decoder_dim=512, dropout=0.5, attention="soft", output_layer="linear",
                 hard_expectation_prob=0.5):
        super().__init__()
        if attention not in ATTENTION_TYPES or output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES} and output_layer one of "
                             f"{OUTPUT_LAYERS}, got {attention!r} and {output_layer!r}")
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        self.attention_type = attention
        self.output_layer = output_layer
        self.deep_output = output_layer == "deep"
        self.hard_expectation_prob = hard_expectation_prob
        self.hard_read = "argmax"
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.lstm = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # gate on the context, section 4.2.1
        if self.deep_output:  # eq. 7: L_o(E y_t-1 + L_h h_t + L_z z_t), E the embedding
            self.deep_h = nn.Linear(decoder_dim, embed_dim)  # L_h
            self.deep_z = nn.Linear(encoder_dim, embed_dim)  # L_z
            self.fc = nn.Linear(embed_dim, vocab_size)  # L_o
        else:
            self.fc = nn.Linear(decoder_dim, vocab_size)
        self._init_weights()

    def _init_weights(self):
        """Uniform embeddings and output layer, zero output bias, as in the tutorial."""
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def init_hidden_state(self, encoder_out):
        """encoder_out: (B, P, E) -> h0, c0: (B, D) each, from the mean encoding."""
        mean_encoding = encoder_out.mean(dim=1)  # (B, E)
        return self.init_h(mean_encoding), self.init_c(mean_encoding)

    def project_encoder(self, encoder_out):
        """The features' term of the attention scores (eq. 4): (B, P, E) -> (B, P, A)."""
        return self.attention.encoder_att(encoder_out)

    def step(self, encoder_out, encoder_proj, embeddings, h, c, read_expectation=None):
        """One decoding step, for K hidden states per image of encoder_out (K = 1 in training, the
        beams in beam search): attention, the gated context and the LSTM.

        Args:
            encoder_out: (B, P, E) float, the features.
            encoder_proj: (B, P, A) float, `project_encoder(encoder_out)`.
            embeddings: (B*K, M) float, the embeddings of the previous words.
            h, c: (B*K, D) float each, the previous LSTM state.
            read_expectation: hard attention in training: (B*K,) bool, the rows that read the
                expectation instead of a sampled cell (None: none of them).
        Returns:
            a Step. The word scores are `output(h, embeddings, context)`: decoding applies the
            output layer at every step, forward once after its loop.
        """
        context, alpha = self.attention(encoder_out, encoder_proj, h)  # (B*K, E), (B*K, P)
        location = None
        if self.attention_type == "hard":
            context, location = self.hard_context(encoder_out, context, alpha, read_expectation)
        # Section 4.2.1's gate beta = sigmoid(f_beta(h)), one per channel here as in the tutorial.
        gated_context = torch.sigmoid(self.f_beta(h)) * context  # (B*K, E)
        h, c = self.lstm(torch.cat([embeddings, gated_context], dim=1), (h, c))  # (B*K, D) each
        return Step(h, c, alpha, gated_context, location)

    def hard_context(self, encoder_out, soft_context, alpha, read_expectation=None):
        """Hard attention's context (section 4.1, eq. 8-9): the feature vector a_s of one cell s.

        In training s ~ Multinoulli(alpha) for every row, except the rows of `read_expectation`,
        which read the expectation sum_i alpha_i a_i (`soft_context`): the paper does so for half
        the images to lower the variance of its gradient estimate. Not training, every row reads
        the most likely cell (hard_read "argmax") or the expectation ("expectation").

        encoder_out (B, P, E); soft_context (B*K, E); alpha (B*K, P). Returns the context (B*K, E)
        and the cell read (B*K,) long, -1 where a row read the expectation.
        """
        rows, num_pixels = alpha.shape
        if not self.training and self.hard_read == "expectation":
            return soft_context, alpha.new_full((rows,), -1, dtype=torch.long)
        if self.training:  # sampled, so no gradient flows through the choice: the loss adds REINFORCE's
            location = torch.multinomial(alpha.detach().float(), 1).squeeze(1)  # (B*K,)
        else:
            location = alpha.argmax(dim=1)  # (B*K,)
        image = torch.arange(rows, device=alpha.device) // (rows // encoder_out.shape[0])  # (B*K,)
        context = encoder_out.reshape(-1, encoder_out.shape[2])[image * num_pixels + location]  # (B*K, E)
        if read_expectation is not None:
            context = torch.where(read_expectation.unsqueeze(1), soft_context, context)  # (B*K, E)
            location = location.masked_fill(read_expectation, -1)  # (B*K,)
        return context, location

    def decode_step(self, encoder_out, encoder_proj, words, h, c):
        """One step of decoding from the previous words (B*K,) long, for beam search and greedy
        decoding: the next word's scores (B*K, V), and the step's new h, c (B*K, D) and alpha (B*K, P)."""
        embeddings = self.embedding(words)  # (B*K, M)
        out = self.step(encoder_out, encoder_proj, embeddings, h, c)
        return self.output(out.h, embeddings, out.context), out.h, out.c, out.alpha

    def output(self, h, embeddings, context):
        """The next word's scores (N, V) from h (N, D), the previous words' embeddings (N, M) and the
        gated contexts (N, E). Linear: fc(dropout(h)), the tutorial's. Deep, eq. 7:
        L_o(E y_t-1 + L_h h_t + L_z z_t), with the tanh and the two dropouts of the paper's code."""
        if not self.deep_output:
            return self.fc(self.dropout(h))
        hidden = torch.tanh(embeddings + self.deep_h(self.dropout(h)) + self.deep_z(context))  # (N, M)
        return self.fc(self.dropout(hidden))

    def forward(self, encoder_out, captions, caption_lengths, captions_per_image=1, return_locations=False):
        """Teacher-forced decoding.

        Args:
            encoder_out: (n, P, E) float, the features of n images.
            captions: (B, L) long, `<start> w1 ... wn <end> <pad>...`, B = n * K: image i's K captions
                are rows i*K .. i*K+K-1 (K = captions_per_image; train.py's default is 1).
            caption_lengths: (B,) long, tokens including `<start>` and `<end>`.
            captions_per_image: K; an image's K captions share its features and their projection, uncopied.
            return_locations: also return the cells a hard model read.
        Returns:
            scores (B, T, V) float for predicting captions[:, 1:T+1] with T = max(decode_lengths)
            (zero at padded steps), alphas (B, T, P) float (zero at padded steps), and
            decode_lengths (B,) long = caption_lengths - 1. Rows stay in the input order. With
            return_locations, also locations (B, T) long: the cell each step read, -1 at padded steps,
            with soft attention, and in the captions that read the expectation.
        """
        num_pixels, batch_size, per_image = encoder_out.shape[1], captions.shape[0], captions_per_image
        decode_lengths = caption_lengths - 1  # (B,)
        image_order, order, real, images_per_step = decoding_order(decode_lengths, per_image)
        max_steps = real.shape[1]
        embeddings = self.embedding(captions[order, :max_steps])  # (B, T, M)
        encoder_out = encoder_out.index_select(0, image_order)  # (n, P, E)
        encoder_proj = self.project_encoder(encoder_out)  # (n, P, A): once per batch, not per step
        h, c = (state.repeat_interleave(per_image, dim=0) for state in self.init_hidden_state(encoder_out))  # (B, D)
        read_expectation = self.captions_reading_expectation(batch_size, encoder_out.device)  # (B,) or None

        hiddens = encoder_out.new_zeros(batch_size, max_steps, h.shape[1])  # (B, T, D)
        alphas = encoder_out.new_zeros(batch_size, max_steps, num_pixels)  # (B, T, P)
        locations = torch.full((batch_size, max_steps), -1, dtype=torch.long, device=encoder_out.device)  # (B, T)
        # Eq. 7 reads each step's context too; the linear output layer keeps none.
        contexts = encoder_out.new_zeros(batch_size, max_steps, self.encoder_dim if self.deep_output else 0)
        for t, images_t in enumerate(images_per_step):
            rows_t = images_t * per_image  # B_t
            # Sliced only when images end: the backward of each slice zero-fills a gradient of the
            # whole (n, P, E), and the first steps all run the whole batch.
            if images_t < encoder_out.shape[0]:  # (n_t, P, E), (n_t, P, A)
                encoder_out, encoder_proj = encoder_out[:images_t], encoder_proj[:images_t]
            h, c, alpha, context, location = self.step(  # (B_t, D), (B_t, D), (B_t, P), (B_t, E), (B_t,) or None
                encoder_out, encoder_proj, embeddings[:rows_t, t], h[:rows_t], c[:rows_t],
                None if read_expectation is None else read_expectation[:rows_t])
            hiddens[:rows_t, t] = h
            alphas[:rows_t, t] = alpha
            if self.deep_output:
                contexts[:rows_t, t] = context
            if location is not None:
                locations[:rows_t, t] = location
        # A caption shorter than its image's longest also stepped past its end: keep its real steps only.
        alphas = torch.where(real.unsqueeze(2), alphas, 0.0)  # (B, T, P)
        locations = locations.masked_fill(~real, -1)  # (B, T)

        # The output layer once after the loop, on the real steps only: in a batch with one long
        # caption most of (B, T) is padding, and the output layer is the decoder's biggest matmul.
        rows, real_steps = real.nonzero(as_tuple=True)  # (N,) each, N real steps
        scores = hiddens.new_zeros(batch_size, max_steps, self.vocab_size)  # (B, T, V)
        # order[rows] undoes the sort as it writes: no copy of the whole (B, T, V) to unsort it.
        scores[order[rows], real_steps] = self.output(hiddens[rows, real_steps], embeddings[rows, real_steps],
                                                      contexts[rows, real_steps])  # (N, V)
        unsort = order.argsort()  # (B,)
        return (scores, alphas[unsort], decode_lengths) + ((locations[unsort],) if return_locations else ())

    def captions_reading_expectation(self, batch_size, device):
        """Hard attention in training: which captions read the expectation this batch, each with
        probability hard_expectation_prob (B,) bool; None otherwise. Drawn per caption, the paper's
        "for a given image"; the rows are already sorted, and each draw is independent."""
        if self.attention_type != "hard" or not self.training:
            return None
        return torch.rand(batch_size, device=device) < self.hard_expectation_prob

    def beam_search(self, encoder_out, start_token, end_token, beam_size=3, max_steps=MAX_STEPS,
                    return_alphas=False, return_scores=False, length_penalty=0.0):
        """Batched beam search from features (B, P, E): see beam_search.beam_search."""
        return beam_search(self, encoder_out, start_token, end_token, beam_size, max_steps, return_alphas,
                           return_scores, length_penalty)

    def greedy_decode(self, encoder_out, start_token, end_token, max_steps=MAX_STEPS, return_alphas=False,
                      return_scores=False):
        """The most likely word at every step, from features (B, P, E): see beam_search.greedy_decode."""
        return greedy_decode(self, encoder_out, start_token, end_token, max_steps, return_alphas, return_scores)
