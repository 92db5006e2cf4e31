"""Show, Attend and Tell: a CNN encoder, soft attention and an LSTM decoder.

Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
https://arxiv.org/abs/1502.03044 (the "soft" deterministic attention of section 4.2).

    from models import Encoder, DecoderWithAttention
    encoder = Encoder(arch="resnet101", pretrained=False)
    decoder = DecoderWithAttention(vocab_size=10000, encoder_dim=encoder.encoder_dim)

Dimension legend used in shape comments:
    B batch (B_t: the captions still going at step t), K beams, P pixels of the encoder grid,
    E encoder dim, D decoder dim, A attention dim, M embedding dim, T caption steps, V vocabulary.
"""

import torch
import torchvision
from torch import nn

from beam_search import beam_search, greedy_decode
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
        """encoder_out: (B, P, E) -> h0, c0: (B, D) each, from the mean encoding."""
        mean_encoding = encoder_out.mean(dim=1)  # (B, E)
        return self.init_h(mean_encoding), self.init_c(mean_encoding)

    def project_encoder(self, encoder_out):
        """The features' term of the attention scores (eq. 4): (B, P, E) -> (B, P, A)."""
        return self.attention.encoder_att(encoder_out)

    def step(self, encoder_out, encoder_proj, embeddings, h, c):
        """One decoding step, for K hidden states per image of encoder_out (K = 1 in training, the
        beams in beam search): attention, the gated context and the LSTM.

        Args:
            encoder_out: (B, P, E) float, the features.
            encoder_proj: (B, P, A) float, `project_encoder(encoder_out)`.
            embeddings: (B*K, M) float, the embeddings of the previous words.
            h, c: (B*K, D) float each, the previous LSTM state.
        Returns:
            the new h and c (B*K, D) each, and alpha (B*K, P), the attention weights. The word scores
            are `fc(dropout(h))`: decoding applies the output layer at every step, forward once
            after its loop.
        """
        context, alpha = self.attention(encoder_out, encoder_proj, h)  # (B*K, E), (B*K, P)
        # Section 4.2.1's gate beta = sigmoid(f_beta(h)), one per channel here as in the tutorial.
        gated_context = torch.sigmoid(self.f_beta(h)) * context  # (B*K, E)
        h, c = self.lstm(torch.cat([embeddings, gated_context], dim=1), (h, c))  # (B*K, D) each
        return h, c, alpha

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

        # Sorted by length, the captions still going at step t are the first batch_size_t rows.
        decode_lengths_sorted, order = decode_lengths.sort(descending=True)  # (B,) each
        steps = torch.arange(max_steps, device=decode_lengths.device)  # (T,)
        real = steps < decode_lengths_sorted.unsqueeze(1)  # (B, T), False at padded steps
        batch_size_per_step = real.sum(0).tolist()  # T ints, read once rather than at every step
        encoder_out = encoder_out.index_select(0, order)  # (B, P, E); a row copy, not indexing per element
        embeddings = self.embedding(captions[order, :max_steps])  # (B, T, M)
        # Eq. 4's term of the features does not depend on the step: projected once per batch, not per step.
        encoder_proj = self.project_encoder(encoder_out)  # (B, P, A)
        h, c = self.init_hidden_state(encoder_out)  # (B, D) each

        hiddens = encoder_out.new_zeros(batch_size, max_steps, h.shape[1])  # (B, T, D)
        alphas = encoder_out.new_zeros(batch_size, max_steps, num_pixels)  # (B, T, P)
        for t, batch_size_t in enumerate(batch_size_per_step):
            # Sliced only when captions end: the backward of each slice zero-fills a gradient of the
            # whole (B, P, E), and the first steps all run the whole batch.
            if batch_size_t < encoder_out.shape[0]:  # (B_t, P, E), (B_t, P, A)
                encoder_out, encoder_proj = encoder_out[:batch_size_t], encoder_proj[:batch_size_t]
            h, c, alpha = self.step(encoder_out, encoder_proj, embeddings[:batch_size_t, t],
                                    h[:batch_size_t], c[:batch_size_t])  # (B_t, D), (B_t, D), (B_t, P)
            hiddens[:batch_size_t, t] = h
            alphas[:batch_size_t, t] = alpha

        # The output layer once after the loop, on the real steps only: in a batch with one long
        # caption most of (B, T) is padding, and the output layer is the decoder's biggest matmul.
        rows, real_steps = real.nonzero(as_tuple=True)  # (N,) each, N real steps
        scores = hiddens.new_zeros(batch_size, max_steps, self.vocab_size)  # (B, T, V)
        # order[rows] undoes the sort as it writes: no copy of the whole (B, T, V) to unsort it.
        scores[order[rows], real_steps] = self.fc(self.dropout(hiddens[rows, real_steps]))  # (N, V)
        return scores, alphas[order.argsort()], decode_lengths

    def beam_search(self, encoder_out, start_token, end_token, beam_size=3, max_steps=50,
                    return_alphas=False, return_scores=False, length_penalty=0.0):
        """Batched beam search from features (B, P, E): see beam_search.beam_search."""
        return beam_search(self, encoder_out, start_token, end_token, beam_size, max_steps, return_alphas,
                           return_scores, length_penalty)

    def greedy_decode(self, encoder_out, start_token, end_token, max_steps=50, return_alphas=False,
                      return_scores=False):
        """The most likely word at every step, from features (B, P, E): see beam_search.greedy_decode."""
        return greedy_decode(self, encoder_out, start_token, end_token, max_steps, return_alphas, return_scores)
