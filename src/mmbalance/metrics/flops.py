"""Training FLOPs, measured on real work with torch's FlopCounterMode (FLOPs = 2 x multiply-adds).

Only ops with a registered formula count (matmuls, convolutions, attention, their backward); elementwise,
normalisation and optimizer arithmetic count zero, as in fvcore. fvcore's per-module forward table is
written beside each run as a cross-check (fvcore counts multiply-adds, so its total x 2 should match).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

log = logging.getLogger(__name__)

# torch has FLOP formulas for the CUDA attention kernels but not for the fused CPU one that BERT and timm's ViT
# dispatch to on a CPU, which would count their attention as zero; it is the same computation.
_aten = torch.ops.aten
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    try:
        @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)
    except RuntimeError:  # a newer torch registered them already
        pass


class FlopMeter:
    """Accumulates the FLOPs of a run's training work.

    The trainer counts the first training step of every epoch exactly and scales it by the number of
    samples the epoch processed (a step's FLOPs are linear in the batch size), and counts every method
    hook outside the step (setup, epoch start/end passes) in full.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.total = 0.0
        self.by_part: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, part: str, scale: float = 1.0):
        """Count the FLOPs inside the block, add `count * scale` to the total under `part`."""
        if not self.enabled:
            yield None
            return
        counter = FlopCounterMode(display=False)
        with counter:
            yield counter
        self.add(part, counter.get_total_flops() * scale)

    def add(self, part: str, flops: float) -> None:
        self.total += flops
        self.by_part[part] = self.by_part.get(part, 0.0) + flops

    def state_dict(self) -> dict:
        return {"total": self.total, "by_part": dict(self.by_part)}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"]
        self.by_part = dict(state["by_part"])


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """Run fn(*args, **kwargs) under FlopCounterMode; return (result, FLOPs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


class _DictInputModel(nn.Module):
    """fvcore traces positional tensors; this wraps the model so a dict batch can be traced."""

    def __init__(self, model: nn.Module, modalities: list[str]):
        super().__init__()
        self.model = model
        self.modalities = modalities

    def forward(self, *tensors):
        return self.model(dict(zip(self.modalities, tensors))).logits


def write_fvcore_table(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> float | None:
    """Write fvcore's per-module forward FLOP table (multiply-adds) for one batch; return its total x 2
    per sample, or None (with a warning in the log and the reason in the file) when tracing fails."""
    modalities = list(model.modalities)
    batch_size = next(iter(inputs.values())).shape[0]
    try:
        wrapper = _DictInputModel(model, modalities).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice (fvcore's import) and its op warnings
            from fvcore.nn import FlopCountAnalysis, flop_count_table

            analysis = FlopCountAnalysis(wrapper, tuple(inputs[m] for m in modalities))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            table = flop_count_table(analysis, max_depth=3)
            total = analysis.total()
        path.write_text(
            f"# fvcore forward FLOP table for one batch of {batch_size} (fvcore counts multiply-adds;\n"
            f"# x2 = {2 * total / batch_size:.4g} FLOPs per sample, to compare with flops/forward_per_sample;\n"
            "# fvcore also counts normalisation layers, which flops/* leave out)\n"
            + table + "\n"
        )
        return 2.0 * total / batch_size
    except Exception as exc:  # fvcore relies on TorchScript tracing, which some modules do not support
        log.warning("fvcore could not trace the model (%s); %s records why", exc, path.name)
        path.write_text(f"fvcore tracing failed: {type(exc).__name__}: {exc}\n")
        return None
