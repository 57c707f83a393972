"""The model Greedy trains: two encoders run stage by stage, joined by MMTM blocks after matching stages."""

from __future__ import annotations

from torch import Tensor, nn

from mmbalance.models.multimodal import Absent, MultimodalModel, mask_modalities


class GreedyModel(MultimodalModel):
    """A two-modality model whose encoders run stage by stage with an MMTM block after matching stages.

    It holds the SAME encoder and fusion modules as the model it wraps (the optimizer already has their
    parameters), so its state dict is the wrapped model's plus `mmtm.*`. Input masking zeroes an absent
    modality's input before encoding, feature masking its pooled feature after; with intermediate fusion the
    absent modality still passes its (zero-input or live) gate signal to the other through the MMTM blocks.
    """

    late_fusion = False

    def __init__(self, base: MultimodalModel, blocks: nn.ModuleList, after_stage: list[int]):
        super().__init__(dict(base.encoders), base.fusion, masking=base.masking)
        self.mmtm = blocks
        self.after_stage = list(after_stage)
        #: set by the method: during training forwards, freeze this modality's (index's) gates to their average
        self.frozen: int | None = None

    def encode(self, inputs: dict[str, Tensor], absent: Absent = ()) -> dict[str, Tensor]:
        mods = self.modalities
        if self.masking == "input":
            inputs = mask_modalities({m: inputs[m] for m in mods}, absent)
        batch_size = inputs[mods[0]].shape[0]
        encs = [self.encoders[m] for m in mods]
        maps = [e.stage_input(inputs[m]) for e, m in zip(encs, mods)]
        stages = [e.stages() for e in encs]
        frozen = self.frozen if self.training else None
        for i in range(len(stages[0])):
            maps = [s[i](x) for s, x in zip(stages, maps)]
            if i in self.after_stage:
                maps = list(self.mmtm[self.after_stage.index(i)](*maps, batch_size=batch_size, frozen=frozen))
        features = {m: e.pool_head(x, batch_size) for m, e, x in zip(mods, encs, maps)}
        return mask_modalities(features, absent) if self.masking == "feature" else features
