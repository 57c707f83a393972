"""Building a run's model from its config: one encoder per modality and the fusion head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mmbalance.config import build
from mmbalance.errors import UserError
from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel

if TYPE_CHECKING:
    from mmbalance.data.batch import ModalitySpec


def build_model(specs: dict[str, ModalitySpec], backbone: DictConfig, num_classes: int, masking: str) -> MultimodalModel:
    """One encoder per modality, chosen by the modality's kind from `backbone.encoders` (or by its name from
    `backbone.per_modality`), and the fusion head `backbone.fusion`."""
    per_modality = backbone.get("per_modality") or {}
    encoders = {}
    for m, spec in specs.items():
        node = per_modality.get(m) or backbone.encoders.get(spec.kind)
        if node is None:
            raise UserError(
                f"backbone.encoders has no encoder for the {spec.kind!r} kind of modality {m!r}; "
                f"add backbone.encoders.{spec.kind} or pick another backbone"
            )
        encoders[m] = build(node, in_shape=tuple(spec.shape))
    dims = {m: int(e.out_dim) for m, e in encoders.items()}
    fusion = build_fusion(backbone.fusion, dims, num_classes, **(backbone.get("fusion_kwargs") or {}))
    return MultimodalModel(encoders, fusion, masking=masking)
