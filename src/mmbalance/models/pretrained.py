"""Encoders built on pretrained models: a Hugging Face text transformer and a timm Vision Transformer.

Both follow the encoder contract of ``mmbalance.models.encoders`` (``Encoder(in_shape, **kwargs)``,
``out_dim``, ``forward(x) -> (B, out_dim)``, ``kinds``).

Weights are read from local files only; nothing here ever downloads. Where a model or checkpoint is asked
for and is not on disk, a ``UserError`` says where it looked and what to put there. The places looked at
are the standard caches, resolved when the encoder is built (so ``HF_HOME``/``HF_HUB_CACHE``/``TORCH_HOME``
set by the user are honoured):

* the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
  which is where ``transformers`` and timm >= 0.9 put what they download;
* for timm checkpoints hosted at a URL (older timm), the torch hub cache ``$TORCH_HOME/hub/checkpoints``

(``mmbalance.paths`` resolves both; ``mmbalance.models.weights`` finds and reads the files).

transformers and timm are imported when an encoder is built, not when this module is imported, so the
config validator can resolve ``_target_`` paths cheaply.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmbalance.errors import UserError
from mmbalance.models.encoder_utils import (check_batch, check_input, check_positive, check_token_ids,
                                            mean_over_frames, output_projection, token_mask)
from mmbalance.models.weights import find_timm_weights
from mmbalance.paths import from_pretrained_offline, text_model_source

__all__ = ["TextTransformerEncoder", "ViTEncoder"]

_TOKENS = {1: "tokens (L,) int64 ids, 0 = padding"}
_IMAGE = {3: "image (C, H, W)", 4: "frames (T, C, H, W)"}

# ------------------------------------------------------------------------------------ TextTransformerEncoder


class TextTransformerEncoder(nn.Module):
    """A pretrained Hugging Face transformer (BERT-style encoder) for the ``tokens`` kind: (L,) int64 ids.

    ``model`` is a hub name present in the local Hugging Face cache (default ``bert-base-uncased``, the
    text encoder of BalanceBenchmark's FOOD-101 recipe) or a local folder with config.json and weights.
    It is loaded with ``local_files_only=True``; when it is not available offline a ``UserError`` says
    where it looked and how to put it there.

    The attention mask is ``ids != 0`` (0 = padding, the dataset convention). The first position is always
    attended, so an all-padding row -- an absent modality zeroes its ids -- still gives a finite feature
    (attention over zero keys would be a 0/0). When the model's own padding id is not 0 (e.g. RoBERTa's 1),
    ``mmbalance.data.text.Tokenizer`` swaps that id with 0 in the stored ids and this encoder swaps them back.

    ``pooling``: "cls" (the first token's last hidden state, default), "mean" (mean over attended
    tokens) or "pooler" (BERT's tanh pooler output, BalanceBenchmark's choice). ``out_dim``: an optional
    Linear projection (BalanceBenchmark projects 768 -> 1024); None keeps the hidden size.
    ``freeze``: keep the transformer's weights fixed (and its dropout off) and train only the projection.
    ``attn_implementation``: passed to transformers ("sdpa", "eager", ...; None = transformers' default).
    """

    kinds = ("tokens",)

    def __init__(
        self,
        in_shape: tuple[int, ...],
        model: str = "bert-base-uncased",
        pooling: str = "cls",
        out_dim: int | None = None,
        freeze: bool = False,
        attn_implementation: str | None = None,
    ):
        super().__init__()
        name = "TextTransformerEncoder"
        self.in_shape = check_input(name, in_shape, _TOKENS)
        if pooling not in ("cls", "mean", "pooler"):
            raise UserError(f"{name}: pooling must be 'cls', 'mean' or 'pooler', got {pooling!r}")
        self.pooling = pooling
        self.model_name = str(model)
        self.transformer = _load_text_model(self.model_name, pooling == "pooler", attn_implementation)
        config = self.transformer.config
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
        if hidden <= 0:
            raise UserError(f"{name}: model {self.model_name!r} has no hidden_size in its config")
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and self.in_shape[0] > int(max_pos):
            raise UserError(f"{name}: token length {self.in_shape[0]} exceeds the model's {max_pos} positions")
        self.vocab_size = int(config.vocab_size)
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        self.freeze = bool(freeze)
        if self.freeze:
            self.transformer.requires_grad_(False)
            self.transformer.eval()
        self.proj, self.out_dim = output_projection(name, hidden, out_dim)

    def train(self, mode: bool = True) -> "TextTransformerEncoder":
        super().train(mode)
        if self.freeze:  # a frozen transformer is a fixed feature extractor: no dropout noise
            self.transformer.eval()
        return self

    def forward(self, ids: Tensor) -> Tensor:
        check_batch("TextTransformerEncoder", ids, self.in_shape)
        check_token_ids("TextTransformerEncoder", ids, self.vocab_size)
        ids = ids.long()
        mask = token_mask(ids)  # ids != 0 with the first position kept: an all-padding row stays finite
        if self.pad_id != 0:  # undo the Tokenizer's swap of the model's padding id with 0
            ids = torch.where(ids == 0, self.pad_id, torch.where(ids == self.pad_id, 0, ids))
        out = self.transformer(input_ids=ids, attention_mask=mask.long())
        if self.pooling == "pooler":
            feats = out.pooler_output
        elif self.pooling == "cls":
            feats = out.last_hidden_state[:, 0]
        else:
            h = out.last_hidden_state
            w = mask.unsqueeze(-1).to(h.dtype)
            feats = (h * w).sum(dim=1) / w.sum(dim=1)
        return self.proj(feats)


def _load_text_model(model: str, with_pooler: bool, attn_implementation: str | None) -> nn.Module:
    """AutoModel.from_pretrained(model, local_files_only=True) from a folder or the local hub cache."""
    try:
        from transformers import AutoModel
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise UserError(f"TextTransformerEncoder needs the transformers package ({exc})") from exc
    source = text_model_source(model)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    weights = "model.safetensors or pytorch_model.bin"
    net = from_pretrained_offline(
        source, AutoModel.from_pretrained, options,
        who="TextTransformerEncoder", what="pretrained text model",
        folder_holds=f"a transformers config.json (with model_type) and the weights ({weights})",
        local_forms=f"a local model folder (config.json plus {weights})",
    )
    if with_pooler:
        if getattr(net, "pooler", None) is None:
            raise UserError(
                f"TextTransformerEncoder: pooling='pooler' but {source.name!r} has no pooler; use 'cls' or 'mean'"
            )
    elif getattr(net, "pooler", None) is not None:
        # the pooler is unused here; a parameter without gradients would confuse methods that read them
        net.pooler = None
    return net


# --------------------------------------------------------------------------------------------- ViTEncoder


class ViTEncoder(nn.Module):
    """A timm Vision Transformer for images (C, H, W) and frames (T, C, H, W); out_dim = the embed dim.

    ``model`` is a timm architecture name (default ``vit_base_patch16_224``, the ViT-B/16 that
    BalanceBenchmark lists as ``ViT_B``). The image size is taken from ``in_shape`` (H, W must be
    multiples of the patch size) and the input channels from C, so a 32-px test can use a small config:
    ``depth``, ``embed_dim``, ``num_heads`` and ``patch_size`` override the architecture's values when set,
    and ``model_kwargs`` passes anything else to ``timm.create_model``. The classifier head is removed
    (``num_classes=0``) and the pooled feature is timm's (the class token for ViT-B/16).

    ``pretrained=True`` reads the checkpoint from ``weights_path`` or from the local caches (see
    ``find_timm_weights``), never from the network; timm then adapts it to this image size (position
    embeddings resampled) and channel count (first-conv weights adapted).

    Frames are folded into the batch and the per-frame features averaged over time (as ResNet18Encoder).
    """

    kinds = ("image", "frames")

    def __init__(
        self,
        in_shape: tuple[int, ...],
        model: str = "vit_base_patch16_224",
        pretrained: bool = False,
        weights_path: str | None = None,
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        patch_size: int | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        name = "ViTEncoder"
        self.in_shape = check_input(name, in_shape, _IMAGE)
        self.is_frames = len(self.in_shape) == 4
        c, h, w = self.in_shape[-3:]
        import timm

        if not timm.is_model(str(model).split(".")[0]):
            raise UserError(
                f"{name}: {model!r} is not a timm model name (e.g. vit_base_patch16_224, vit_tiny_patch16_224)"
            )
        kwargs = dict(model_kwargs or {})
        for key, value in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads),
                           ("patch_size", patch_size)):
            if value is not None:
                check_positive(name, **{key: value})
                kwargs[key] = int(value)
        weights = find_timm_weights(str(model), weights_path, name) if pretrained else None
        try:
            net = timm.create_model(
                str(model), pretrained=weights is not None, num_classes=0, img_size=(h, w), in_chans=c,
                drop_path_rate=float(drop_path_rate),
                **({"pretrained_cfg_overlay": {"file": weights}} if weights else {}), **kwargs,
            )
        except UserError:
            raise
        except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as exc:
            what = f" with the checkpoint {weights}" if weights else ""
            raise UserError(f"{name}: timm could not build {model!r}{what} for input {self.in_shape}: {exc}") from exc
        patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
        if patch is not None and (h % patch[0] or w % patch[1]):
            raise UserError(
                f"{name}: image size {h}x{w} is not a multiple of the patch size {tuple(patch)} ("
                + ("as patch_size sets it" if patch_size is not None else f"{model}'s own") + "); set "
                f"backbone.encoders.{'frames' if self.is_frames else 'image'}.patch_size to a divisor of {h} and {w} "
                "(the 8x8 digits_av demo: patch_size=4, or 2) or use images of at least the patch size"
            )
        self.net = net
        self.pretrained = weights is not None
        self.weights_file = weights
        self.out_dim = int(net.num_features)

    def forward(self, x: Tensor) -> Tensor:
        check_batch("ViTEncoder", x, self.in_shape)
        if self.is_frames:
            return mean_over_frames(self.net, x)
        return self.net(x)
