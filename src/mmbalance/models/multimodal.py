"""The multimodal model: per-modality encoders, one fusion head, and the one masking function."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from mmbalance.models.fusion import Fusion

MASKING_LEVELS = ("input", "feature")

# An absence spec: modality names absent for the whole batch, or {modality: (B,) bool, True = absent}
Absent = Collection[str] | Mapping[str, Tensor]


def mask_modalities(tensors: dict[str, Tensor], absent: Absent) -> dict[str, Tensor]:
    """Zero the absent modalities' tensors (inputs or pooled features). The only place absence is made.

    `absent` is either a collection of modality names (absent for every sample) or a mapping
    {modality: (B,) bool tensor} for per-sample absence (CML, sample-level valuation).
    """
    if not absent:
        return tensors
    out = dict(tensors)
    if isinstance(absent, Mapping):
        for m, mask in absent.items():
            x = tensors[m]
            keep = (~mask.bool()).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            out[m] = x * keep
    else:
        for m in absent:
            out[m] = torch.zeros_like(tensors[m])
    return out


def float32_unimodal_logits(fusion: Fusion, features: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each modality's logits in the head's own precision (float32), whatever autocast is active.

    Under `hardware.precision=bf16` the features come out of autocast in bfloat16, but the logits are
    often computed later, outside it (OGM-GE reads `Output.unimodal` after backward), where a bf16
    feature times a float32 weight is an error. Casting the features up and computing with autocast off
    gives the same logits wherever they are read, and full-precision inputs to the per-modality scores
    that drive methods' coefficients; the head is one small product, so float32 costs nothing measurable.
    Gradients still reach the bf16 features through the cast.
    """
    head_param = next(fusion.parameters(), None)
    dtype = torch.float32 if head_param is None else head_param.dtype
    device_type = next(iter(features.values())).device.type
    precise = {m: f.to(dtype) for m, f in features.items()}
    if not torch.amp.is_autocast_available(device_type):
        return fusion.unimodal_logits(precise)
    with torch.autocast(device_type, enabled=False):
        return fusion.unimodal_logits(precise)


class Output:
    """What a forward pass gives: fused logits, pooled features, and each modality's own logits.

    `unimodal` is computed on first use (most steps of most methods never read it), in float32 (see
    `float32_unimodal_logits`), and is None when the fusion has no linear block per modality. Methods
    that replace it pass `unimodal=` explicitly.
    """

    _UNSET = object()

    def __init__(self, logits: Tensor, features: dict[str, Tensor], unimodal=_UNSET, fusion: Fusion | None = None):
        self.logits = logits
        self.features = features
        self._unimodal = unimodal
        self._fusion = fusion

    @property
    def unimodal(self) -> dict[str, Tensor] | None:
        if self._unimodal is Output._UNSET:
            ok = self._fusion is not None and self._fusion.has_unimodal_logits
            self._unimodal = float32_unimodal_logits(self._fusion, self.features) if ok else None
        return self._unimodal


class MultimodalModel(nn.Module):
    """encoders[m](inputs[m]) -> features[m]; fusion(features) -> logits.

    `masking` says where an absent modality is zeroed: at its input (the peer's convention, the default)
    or at its pooled feature.
    """

    #: late fusion: features are computed independently per modality, so metrics may reuse them
    late_fusion = True

    def __init__(self, encoders: dict[str, nn.Module], fusion: Fusion, masking: str = "input"):
        super().__init__()
        if masking not in MASKING_LEVELS:
            raise ValueError(f"masking={masking!r}; expected one of {MASKING_LEVELS}")
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.masking = masking
        self.modalities = list(encoders)

    def encode(self, inputs: dict[str, Tensor], absent: Absent = ()) -> dict[str, Tensor]:
        if self.masking == "input":
            inputs = mask_modalities({m: inputs[m] for m in self.modalities}, absent)
            return {m: self.encoders[m](inputs[m]) for m in self.modalities}
        features = {m: self.encoders[m](inputs[m]) for m in self.modalities}
        return mask_modalities(features, absent)

    def fuse(self, features: dict[str, Tensor]) -> Tensor:
        return self.fusion(features)

    def unimodal_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return float32_unimodal_logits(self.fusion, features)

    def forward(self, inputs: dict[str, Tensor], absent: Absent = ()) -> Output:
        features = self.encode(inputs, absent)
        return Output(self.fuse(features), features, fusion=self.fusion)

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The explicit modality -> parameters map (each encoder's parameters); the head is separate."""
        return {m: list(self.encoders[m].parameters()) for m in self.modalities}

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fusion.parameters())

    @torch.no_grad()
    def absent_features(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's feature when it is absent, as a (1, d) row valid for every sample.

        In eval mode an encoder's output on an all-zero input is one constant vector, so input masking
        costs one single-sample pass per modality instead of a pass over the data. Feature masking is zero.
        """
        if self.masking == "feature":
            ref = self.fusion.parameters().__next__()
            return {m: ref.new_zeros(1, self.fusion.dims[m]) for m in self.modalities}
        if self.training:
            raise RuntimeError("absent_features needs eval mode (train-mode BatchNorm depends on the batch)")
        return {m: self.encoders[m](torch.zeros_like(inputs[m][:1])) for m in self.modalities}
