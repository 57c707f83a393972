"""What every encoder shares: the per-sample shape contract, positive sizes, frame folding, the output
projection, and token ids with their padding mask. `models/encoders.py` and `models/pretrained.py` build on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmbalance.errors import UserError

__all__ = ["check_batch", "check_input", "check_positive", "check_token_ids", "mean_over_frames", "output_projection",
           "token_mask"]


def check_input(encoder_name: str, in_shape: Sequence[int], accepted_ndims: Mapping[int, str]) -> tuple[int, ...]:
    """Validate a per-sample shape for an encoder; return it as a tuple of ints.

    ``accepted_ndims`` maps each accepted number of dimensions to a description of what that shape is.
    Raises ``UserError`` naming the encoder, the shape received and the shapes it accepts.
    """
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise UserError(f"{encoder_name}: in_shape must be a tuple of ints (the per-sample shape), got {in_shape!r}")
    accepted = "; ".join(f"{n}-D {desc}" for n, desc in sorted(accepted_ndims.items()))
    if len(shape) not in accepted_ndims:
        raise UserError(
            f"{encoder_name} cannot encode a modality with per-sample shape {shape} ({len(shape)}-D); "
            f"it accepts {accepted}. Pick an encoder that fits this modality's kind."
        )
    if any(s <= 0 for s in shape):
        raise UserError(f"{encoder_name}: every dimension of in_shape must be positive, got {shape}")
    return shape


def check_batch(encoder_name: str, x: Tensor, in_shape: tuple[int, ...]) -> None:
    """A batch must be (B, *per-sample shape) in rank; sizes other than channels/features may vary."""
    if x.dim() != len(in_shape) + 1:
        raise UserError(
            f"{encoder_name} was built for per-sample shape {in_shape} and expects a batch of rank "
            f"{len(in_shape) + 1} (B, ...), got a tensor of shape {tuple(x.shape)}"
        )


def check_positive(encoder_name: str, **values: int) -> None:
    for name, v in values.items():
        if int(v) < 1:
            raise UserError(f"{encoder_name}: {name} must be >= 1, got {v}")


def mean_over_frames(encode, x: Tensor) -> Tensor:
    """Frames (B, T, C, H, W): fold time into the batch, encode every frame, average the features over time."""
    b, t = x.shape[:2]
    return encode(x.reshape(b * t, *x.shape[2:])).view(b, t, -1).mean(dim=1)


def output_projection(encoder_name: str, width: int, out_dim: int | None) -> tuple[nn.Module, int]:
    """A Linear from `width` to `out_dim` features, or Identity when out_dim is unset or equal; and the width out."""
    if out_dim is None or int(out_dim) == int(width):
        return nn.Identity(), int(width)
    check_positive(encoder_name, out_dim=out_dim)
    return nn.Linear(int(width), int(out_dim)), int(out_dim)


def check_token_ids(encoder_name: str, ids: Tensor, vocab_size: int) -> None:
    """Token ids must be integers in [0, vocab_size).

    A dataset tokenised for a larger vocabulary than the encoder's would otherwise fail deep inside the
    embedding (on a GPU as a device-side assert that poisons the CUDA context). Costs one reduction per
    batch; skipped while tracing (fvcore).
    """
    if ids.is_floating_point() or ids.is_complex():
        raise UserError(f"{encoder_name}: expects int64 token ids (the tokens kind), got a {ids.dtype} tensor")
    if torch.jit.is_tracing() or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise UserError(
            f"{encoder_name}: token ids range over [{lo}, {hi}] but the vocabulary has {vocab_size} entries; the "
            "dataset's tokenizer and the encoder must share one vocabulary (raise vocab_size, or use the same model)"
        )


def token_mask(ids: Tensor) -> Tensor:
    """(B, L) bool, True = a real token: ids != 0, with the first position always kept.

    Absent-modality masking zeroes the ids (all padding); attention or pooling over no tokens at all is
    0/0, so the first position stays in and the encoder gives a finite, constant feature for such rows.
    """
    mask = ids != 0
    mask[:, 0] = True
    return mask
