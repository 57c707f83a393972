"""Per-modality encoders: each maps a batch of one modality to one pooled feature per sample.

Every encoder is built as ``Encoder(in_shape, **hyperparameters)`` where ``in_shape`` is the modality's
per-sample shape (see ``mmbalance.data.batch.MODALITY_KINDS``); all hyper-parameters are keyword arguments
with defaults, so a Hydra config can hold ``_partial_: true`` and the model builder supplies ``in_shape``.
Each exposes ``out_dim`` and ``forward(x) -> (B, out_dim)``, and lists the modality kinds it accepts in
``kinds``.

In eval mode every encoder is a deterministic function of one sample, so an all-zero input gives the same
feature vector for every sample of a batch (the model reuses that to mask modalities cheaply).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.errors import UserError
from mmbalance.models.encoder_utils import (check_batch, check_input, check_positive, check_token_ids,
                                            mean_over_frames, output_projection, token_mask)
from mmbalance.models.weights import find_timm_weights, load_state_file, resnet18_weights_file

__all__ = ["MLPEncoder", "ResNet18Encoder", "SmallCNN", "TokenEncoder", "TransformerEncoder"]

# ndim of the per-sample shape -> what it is taken to be; used by check_input's messages
_IMAGE = {3: "image (C, H, W) or spectrogram (1, F, T)", 4: "frames (T, C, H, W)"}
_FEATURES = {1: "vector (D,)", 2: "sequence (T, D)"}


# --------------------------------------------------------------------------------------------- SmallCNN


class SmallCNN(nn.Module):
    """A small conv net for images, spectrograms and frames, fast enough to train on a CPU.

    Shape: ``depth`` blocks of conv3x3-BN-ReLU (plain 2-D conv kernels, so methods that act on "conv
    kernels" find 4-D weights); channels start at ``width`` and double per block (capped at 8x width).
    After a block, each spatial axis is halved by max-pooling only while it is at least ``min_pool_size``
    long, so 8x8 digit images and 129x63 spectrograms both work and no axis collapses to nothing.

    Pooling (``pool``): global average pooling would throw away *where* the energy is, which for a
    spectrogram is the frequency axis: measured, audio accuracy fell to 31-45 % with it. So the map is
    adaptively average-pooled to a coarse grid, flattened, and projected by Linear+ReLU to ``out_dim``:

    - ``"time"``: ``(grid, 1)`` -- keep ``grid`` frequency (height) bands, average over time (width).
      For spectrograms (1, F, T): shift-invariant in time, keeps the spectral envelope.
    - ``"time_max"``: the maximum over time, then ``grid`` frequency bands. For a short event at an unknown
      offset in a long window (a spoken word in the demo's one-second clip) the average over time dilutes
      the event with noise-only frames; the maximum keeps it.
    - ``"grid"``: ``(grid, grid)`` -- keep a coarse spatial layout; for images and video frames.
    - ``"auto"`` (default): ``"time"`` when the per-sample shape looks like this project's spectrograms
      (3-D, one channel, height != width), otherwise ``"grid"``. A square one-channel map (a grayscale
      image, or a square spectrogram) gets ``"grid"``, which still keeps the frequency axis; set
      ``pool`` explicitly when the heuristic is wrong.

    Frames (B, T, C, H, W) are folded into the batch, encoded frame by frame, and the per-frame features
    (after the final Linear+ReLU) averaged over time.
    """

    kinds = ("image", "spectrogram", "frames")

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int = 32,
        depth: int = 3,
        out_dim: int = 128,
        grid: int = 4,
        pool: str = "auto",
        min_pool_size: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        name = "SmallCNN"
        self.in_shape = check_input(name, in_shape, _IMAGE)
        check_positive(name, width=width, depth=depth, out_dim=out_dim, grid=grid, min_pool_size=min_pool_size)
        if pool not in ("auto", "time", "time_max", "grid"):
            raise UserError(f"{name}: pool must be 'auto', 'time', 'time_max' or 'grid', got {pool!r}")
        self.is_frames = len(self.in_shape) == 4
        c, h, w = self.in_shape[-3:]
        if pool == "auto":
            pool = "time" if (not self.is_frames and c == 1 and h != w) else "grid"
        self.pool = pool

        layers: list[nn.Module] = []
        in_ch = c
        self._stage_ends: list[int] = []  # where each conv block ends in `features` (for stages())
        self._stage_channels: list[int] = []
        for i in range(int(depth)):
            out_ch = int(width) * 2 ** min(i, 3)
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            kh = 2 if h >= min_pool_size else 1
            kw = 2 if w >= min_pool_size else 1
            if kh > 1 or kw > 1:
                layers.append(nn.MaxPool2d((kh, kw)))
                h, w = h // kh, w // kw
            in_ch = out_ch
            self._stage_ends.append(len(layers))
            self._stage_channels.append(out_ch)
        self.features = nn.Sequential(*layers)
        self.grid = (int(grid), 1) if pool in ("time", "time_max") else (int(grid), int(grid))
        self.avgpool = nn.AdaptiveAvgPool2d(self.grid)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(in_ch * self.grid[0] * self.grid[1], int(out_dim)),
            nn.ReLU(inplace=True),
        )
        self.out_dim = int(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_batch("SmallCNN", x, self.in_shape)
        if self.is_frames:
            return mean_over_frames(self._encode, x)
        return self._encode(x)

    def _encode(self, x: Tensor) -> Tensor:
        maps = self.features(x)
        if self.pool == "time_max":
            maps = maps.amax(dim=-1, keepdim=True)
        return self.head(self.avgpool(maps))

    # ---- stage-wise access, for intermediate fusion (Greedy's MMTM blocks between stages) ----
    # stage_input(x) -> run each of stages() in turn -> pool_head(maps, B) equals forward(x).

    def stage_input(self, x: Tensor) -> Tensor:
        """The (N, C, H, W) input of the first stage: frames (B, T, C, H, W) are folded to N = B*T."""
        check_batch("SmallCNN", x, self.in_shape)
        return x.reshape(-1, *x.shape[2:]) if self.is_frames else x

    def stages(self) -> list[nn.Module]:
        """One module per conv block (conv-BN-ReLU[-MaxPool]), sharing this encoder's layers."""
        starts = [0] + self._stage_ends[:-1]
        return [self.features[a:b] for a, b in zip(starts, self._stage_ends)]

    def stage_channels(self) -> list[int]:
        """Channels of each stage's output map."""
        return list(self._stage_channels)

    def pool_head(self, maps: Tensor, batch_size: int) -> Tensor:
        """Pooling and projection after the last stage; frames are unfolded and averaged over time."""
        feats = self._encode_maps(maps)
        return feats.view(batch_size, -1, feats.shape[-1]).mean(dim=1) if self.is_frames else feats

    def _encode_maps(self, maps: Tensor) -> Tensor:
        if self.pool == "time_max":
            maps = maps.amax(dim=-1, keepdim=True)
        return self.head(self.avgpool(maps))


# --------------------------------------------------------------------------------------- ResNet18Encoder

class ResNet18Encoder(nn.Module):
    """torchvision ResNet-18 trunk (fc removed, out_dim 512): the benchmark backbone for audio and video.

    The first conv is rebuilt for C in {1, 2, 3} input channels (spectrograms, optical flow, RGB).
    Frames (B, T, C, H, W) are folded into the batch; the 512-d globally pooled per-frame features are
    averaged over time.

    ``pretrained=True`` loads ImageNet weights from a local file only; nothing is downloaded, and a
    missing file raises ``UserError`` saying where it looked. ``source`` picks where they come from:

    - ``"torchvision"`` (default): torchvision's IMAGENET1K_V1 checkpoint, from ``weights_path`` or, when
      that is unset, the torch hub cache (``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth``);
    - ``"timm"``: the timm checkpoint ``timm_model`` (default ``resnet18.a1_in1k``, timm's default
      ResNet-18 weights; ``resnet18.tv_in1k`` is torchvision's weights as timm hosts them), from
      ``weights_path`` (a .safetensors/.pth file) or from the Hugging Face hub cache where timm keeps what
      it downloads (``$HF_HOME/hub/models--timm--resnet18.a1_in1k``). timm's ResNet-18 uses torchvision's
      parameter names, so the checkpoint loads into the same trunk (and ``stages()`` stay the same).

    For C != 3 the pretrained first-conv kernel is the average of its RGB kernels, copied to each of the C
    channels (the usual cross-modality initialisation for grayscale/flow input).
    """

    kinds = ("image", "spectrogram", "frames")

    def __init__(
        self,
        in_shape: tuple[int, ...],
        pretrained: bool = False,
        weights_path: str | None = None,
        source: str = "torchvision",
        timm_model: str = "resnet18.a1_in1k",
    ):
        super().__init__()
        from torchvision.models import resnet18

        name = "ResNet18Encoder"
        self.in_shape = check_input(name, in_shape, _IMAGE)
        self.is_frames = len(self.in_shape) == 4
        c = self.in_shape[-3]
        if c not in (1, 2, 3):
            raise UserError(f"{name}: input channels must be 1, 2 or 3, got C={c} (in_shape {self.in_shape})")
        if source not in ("torchvision", "timm"):
            raise UserError(f"{name}: source must be 'torchvision' or 'timm', got {source!r}")
        if str(timm_model).split(".")[0] != "resnet18":
            raise UserError(
                f"{name}: timm_model must be a resnet18 checkpoint (e.g. resnet18.a1_in1k), got {timm_model!r}"
            )
        self.source = source
        state = None
        if pretrained:  # fail before the slow build
            state = self._load_pretrained(weights_path) if source == "torchvision" else self._load_timm(
                timm_model, weights_path)
        net = resnet18(weights=None)
        if state is not None:
            if source == "torchvision":
                net.load_state_dict(state)
            else:
                # timm's exported checkpoints may leave out BatchNorm's num_batches_tracked counters
                missing, unexpected = net.load_state_dict(state, strict=False)
                missing = [k for k in missing if not k.endswith("num_batches_tracked")]
                if missing or unexpected:
                    raise UserError(
                        f"ResNet18Encoder: the timm checkpoint does not match ResNet-18 (missing "
                        f"{missing[:4]}, unexpected {unexpected[:4]}); is it a resnet18 checkpoint?"
                    )
        if c != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(c, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
            if state is not None:
                with torch.no_grad():
                    net.conv1.weight.copy_(old.weight.mean(dim=1, keepdim=True).expand(-1, c, -1, -1))
        net.fc = nn.Identity()
        self.net = net
        self.pretrained = bool(pretrained)
        self.out_dim = 512

    @staticmethod
    def _load_pretrained(weights_path: str | None) -> dict:
        path = os.path.expanduser(str(weights_path)) if weights_path else resnet18_weights_file()
        if not os.path.isfile(path):
            raise UserError(
                f"ResNet18Encoder(pretrained=True) needs torchvision's ImageNet ResNet-18 weights, but the file "
                f"{path} does not exist (no download is attempted). Put resnet18-f37072fd.pth there "
                f"(from https://download.pytorch.org/models/resnet18-f37072fd.pth), point weights_path at a "
                f"local copy, or set pretrained=false."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"ResNet18Encoder: could not read pretrained weights from {path}: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or "conv1.weight" not in state:
            raise UserError(f"ResNet18Encoder: {path} is not a torchvision ResNet-18 state dict (no conv1.weight)")
        return state

    @staticmethod
    def _load_timm(timm_model: str, weights_path: str | None) -> dict:
        path = find_timm_weights(timm_model, weights_path, "ResNet18Encoder")
        state = load_state_file(path, "ResNet18Encoder")
        if "conv1.weight" not in state or "layer4.1.conv2.weight" not in state:
            raise UserError(f"ResNet18Encoder: {path} is not a timm/torchvision ResNet-18 state dict "
                            "(no conv1.weight / layer4.1.conv2.weight)")
        return state

    def forward(self, x: Tensor) -> Tensor:
        check_batch("ResNet18Encoder", x, self.in_shape)
        if self.is_frames:
            return mean_over_frames(self.net, x)
        return self.net(x)

    # ---- stage-wise access, for intermediate fusion (Greedy's MMTM blocks between stages) ----
    # stage_input(x) -> run each of stages() in turn -> pool_head(maps, B) equals forward(x).

    def stage_input(self, x: Tensor) -> Tensor:
        """The (N, C, H, W) input of the first stage: frames (B, T, C, H, W) are folded to N = B*T."""
        check_batch("ResNet18Encoder", x, self.in_shape)
        return x.reshape(-1, *x.shape[2:]) if self.is_frames else x

    def stages(self) -> list[nn.Module]:
        """[stem + layer1, layer2, layer3, layer4], sharing this encoder's layers."""
        n = self.net
        return [nn.Sequential(n.conv1, n.bn1, n.relu, n.maxpool, n.layer1), n.layer2, n.layer3, n.layer4]

    def stage_channels(self) -> list[int]:
        """Channels of each stage's output map."""
        return [64, 128, 256, 512]

    def pool_head(self, maps: Tensor, batch_size: int) -> Tensor:
        """Global average pooling (and the removed fc, an Identity); frames averaged over time."""
        feats = self.net.fc(torch.flatten(self.net.avgpool(maps), 1))
        return feats.view(batch_size, -1, feats.shape[-1]).mean(dim=1) if self.is_frames else feats


# ------------------------------------------------------------------------------------------- MLPEncoder


class MLPEncoder(nn.Module):
    """An MLP for feature vectors (D,): ``layers`` Linear layers, ReLU after each (dropout between).

    With ``layers=2``: Linear(D, hidden)-ReLU-Dropout-Linear(hidden, out_dim)-ReLU. Sequences (T, D) are
    mean-pooled over time first, so a pre-extracted feature sequence can use the cheap encoder too.
    """

    kinds = ("vector", "sequence")

    def __init__(
        self,
        in_shape: tuple[int, ...],
        hidden: int = 256,
        layers: int = 2,
        out_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        name = "MLPEncoder"
        self.in_shape = check_input(name, in_shape, _FEATURES)
        check_positive(name, hidden=hidden, layers=layers, out_dim=out_dim)
        self.is_sequence = len(self.in_shape) == 2
        dims = [self.in_shape[-1]] + [int(hidden)] * (int(layers) - 1) + [int(out_dim)]
        mods: list[nn.Module] = []
        for i in range(int(layers)):
            if i > 0 and dropout > 0:
                mods.append(nn.Dropout(dropout))
            mods += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*mods)
        self.out_dim = int(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_batch("MLPEncoder", x, self.in_shape)
        if self.is_sequence:
            x = x.mean(dim=1)
        return self.mlp(x)


# ----------------------------------------------------------------------------------- TransformerEncoder


def _relu(x: Tensor) -> Tensor:
    return F.relu(x)


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


class _CountableEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer that never takes PyTorch's fused inference fast paths.

    In eval mode (with grad off) ``nn.TransformerEncoderLayer`` calls ``torch._transformer_encoder_layer_fwd``
    and ``nn.MultiheadAttention`` calls ``torch._native_multi_head_attention``; FlopCounterMode has no
    formula for either and reports 0 FLOPs. Two changes keep the ordinary path: the activation is a plain
    Python function (the layer only fuses when it recognises F.relu/F.gelu), and self-attention calls
    ``F.multi_head_attention_forward`` directly instead of the MultiheadAttention module (which would
    choose its own fast path). The arithmetic is the same as the unfused path.
    """

    def _sa_block(
        self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool = False
    ) -> Tensor:
        a = self.self_attn
        q = x.transpose(0, 1) if a.batch_first else x
        out, _ = F.multi_head_attention_forward(
            q, q, q, a.embed_dim, a.num_heads,
            a.in_proj_weight, a.in_proj_bias, a.bias_k, a.bias_v, a.add_zero_attn,
            a.dropout, a.out_proj.weight, a.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=False,
            attn_mask=attn_mask, is_causal=is_causal,
        )  # fmt: skip
        if a.batch_first:
            out = out.transpose(0, 1)
        return self.dropout1(out)


class TransformerEncoder(nn.Module):
    """A small Transformer for feature sequences (T, D), e.g. CMU-MOSEI's text/audio/visual streams.

    Linear projection D -> d_model, plus a learned positional embedding (up to ``max_len`` steps),
    ``layers`` post-norm ``nn.TransformerEncoderLayer`` blocks (batch_first), mean pooling over time,
    then a Linear to ``out_dim`` when ``out_dim`` is set and differs from ``d_model``. Every sequence is
    taken as full length (no padding mask). Vectors (D,) are treated as length-1 sequences.

    FLOP counting: ``nn.TransformerEncoder`` is built with ``enable_nested_tensor=False`` and its layers
    never take PyTorch's fused eval fast path (see ``_CountableEncoderLayer``), so
    ``torch.utils.flop_counter.FlopCounterMode`` counts the attention and feed-forward FLOPs in eval mode
    too. ``activation`` is "relu" or "gelu".
    """

    kinds = ("sequence", "vector")

    def __init__(
        self,
        in_shape: tuple[int, ...],
        d_model: int = 64,
        nhead: int = 4,
        layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        max_len: int = 512,
        out_dim: int | None = None,
        activation: str = "gelu",
    ):
        super().__init__()
        name = "TransformerEncoder"
        self.in_shape = check_input(name, in_shape, _FEATURES)
        check_positive(name, d_model=d_model, nhead=nhead, layers=layers, dim_feedforward=dim_feedforward, max_len=max_len)
        if d_model % nhead:
            raise UserError(f"{name}: d_model ({d_model}) must be divisible by nhead ({nhead})")
        if activation not in ("relu", "gelu"):
            raise UserError(f"{name}: activation must be 'relu' or 'gelu', got {activation!r}")
        self.is_vector = len(self.in_shape) == 1
        t = 1 if self.is_vector else self.in_shape[0]
        if t > max_len:
            raise UserError(f"{name}: sequence length {t} exceeds max_len={max_len}; raise max_len")
        self.max_len = int(max_len)
        self.input_proj = nn.Linear(self.in_shape[-1], int(d_model))
        self.pos_embedding = nn.Parameter(torch.zeros(1, int(max_len), int(d_model)))
        nn.init.normal_(self.pos_embedding, std=0.02)
        layer = _CountableEncoderLayer(
            int(d_model), int(nhead), int(dim_feedforward), dropout,
            activation=_gelu if activation == "gelu" else _relu, batch_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, int(layers), enable_nested_tensor=False)
        self.proj, self.out_dim = output_projection(name, d_model, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_batch("TransformerEncoder", x, self.in_shape)
        if self.is_vector:
            x = x.unsqueeze(1)
        t = x.shape[1]
        if t > self.max_len:
            raise UserError(f"TransformerEncoder: got a sequence of length {t} > max_len={self.max_len}")
        h = self.input_proj(x) + self.pos_embedding[:, :t]
        h = self.encoder(h)
        return self.proj(h.mean(dim=1))


# ----------------------------------------------------------------------------------------- TokenEncoder


class TokenEncoder(nn.Module):
    """A small from-scratch encoder for token ids (L,) int64 (the ``tokens`` kind), trainable on a CPU.

    ``Embedding(vocab_size, d_model, padding_idx=0)`` plus a learned positional embedding, then ``layers``
    post-norm Transformer layers with a key-padding mask (0 = padding; built like TransformerEncoder's so
    FlopCounterMode sees them in eval too), then the mean over the real tokens and an optional Linear to
    ``out_dim``. ``layers=0`` is the mean of the token embeddings (a bag of words). The default
    ``vocab_size`` 30522 is the bert-base-uncased WordPiece vocabulary (``mmbalance.data.text.Tokenizer``'s
    default); a tokenizer with a larger vocabulary needs a larger ``vocab_size``. The first position is
    always counted as a token (see ``token_mask``), so an all-padding row gives a finite feature.
    """

    kinds = ("tokens",)

    def __init__(
        self,
        in_shape: tuple[int, ...],
        vocab_size: int = 30522,
        d_model: int = 64,
        nhead: int = 4,
        layers: int = 1,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        out_dim: int | None = None,
    ):
        super().__init__()
        name = "TokenEncoder"
        self.in_shape = check_input(name, in_shape, {1: "tokens (L,) int64 ids, 0 = padding"})
        check_positive(name, vocab_size=vocab_size, d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward)
        if int(layers) < 0:
            raise UserError(f"{name}: layers must be >= 0, got {layers}")
        if int(layers) and d_model % nhead:
            raise UserError(f"{name}: d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.vocab_size = int(vocab_size)
        self.embedding = nn.Embedding(self.vocab_size, int(d_model), padding_idx=0)
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.in_shape[0], int(d_model)))
        nn.init.normal_(self.pos_embedding, std=0.02)
        if int(layers):
            layer = _CountableEncoderLayer(int(d_model), int(nhead), int(dim_feedforward), dropout,
                                           activation=_gelu, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, int(layers), enable_nested_tensor=False)
        else:
            self.encoder = None
        self.proj, self.out_dim = output_projection(name, d_model, out_dim)

    def forward(self, ids: Tensor) -> Tensor:
        check_batch("TokenEncoder", ids, self.in_shape)
        check_token_ids("TokenEncoder", ids, self.vocab_size)
        ids = ids.long()
        mask = token_mask(ids)
        h = self.embedding(ids) + self.pos_embedding[:, : ids.shape[1]]
        if self.encoder is not None:
            h = self.encoder(h, src_key_padding_mask=~mask)
        w = mask.unsqueeze(-1).to(h.dtype)
        return self.proj((h * w).sum(dim=1) / w.sum(dim=1))
