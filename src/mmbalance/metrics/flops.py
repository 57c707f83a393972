"""Training FLOPs, measured on real work with torch's FlopCounterMode (FLOPs = 2 x multiply-adds).

Only ops with a registered formula count (matmuls, convolutions, attention, their backward); elementwise,
normalisation and optimizer arithmetic count zero, as in fvcore. fvcore's per-module forward table is
written beside each run as a cross-check (fvcore counts multiply-adds, so its total x 2 should match).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
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


def _dispatch_depth() -> int | None:
    """How many torch dispatch modes are active (None when this torch cannot say)."""
    depth = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return depth() if depth is not None else None


class _Segment:
    """One open `FlopMeter.measure` block: its counter (None while a sampled pass has paused it) and the FLOPs
    counted so far."""

    def __init__(self, part: str, scale: float):
        self.part, self.scale = part, scale
        self.flops = 0.0
        self.counter: FlopCounterMode | None = None
        self.depth: int | None = None

    def start(self) -> None:
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()
        self.depth = _dispatch_depth()

    def stop(self) -> None:
        counter, self.counter = self.counter, None
        counter.__exit__(None, None, None)
        self.flops += counter.get_total_flops()

    def on_top(self) -> bool:
        """Whether this block's counter is the innermost dispatch mode, so it can be paused and resumed without
        disturbing another mode entered after it."""
        return self.counter is not None and self.depth is not None and _dispatch_depth() == self.depth


class SampledPass:
    """What `FlopMeter.sampled_pass` yields: `with sample(n):` around each batch's work."""

    def __init__(self, measured: bool):
        self.measured = measured
        self.first_flops = 0
        self.first_samples = 0
        self.samples = 0

    @contextlib.contextmanager
    def __call__(self, samples: int):
        if self.measured and self.first_samples == 0 and samples > 0:
            counter = FlopCounterMode(display=False)
            with counter:
                yield
            self.first_flops, self.first_samples = counter.get_total_flops(), samples
        else:
            yield
        self.samples += samples

    @property
    def flops(self) -> float:
        """The first batch's FLOPs scaled to every sample of the pass."""
        return self.first_flops * self.samples / self.first_samples if self.first_samples else 0.0


class FlopMeter:
    """Accumulates the FLOPs of a run's training work.

    The trainer counts the first training step of every epoch exactly and scales it by the number of
    samples the epoch processed (a step's FLOPs are linear in the batch size), and counts every method
    hook outside the step (setup, epoch start/end) under `measure`: in full, except the passes over batches a
    hook declares with `sampled_pass`, which are counted the same way as the training steps.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.total = 0.0
        self.by_part: dict[str, float] = {}
        self._open: list[_Segment] = []

    @contextlib.contextmanager
    def measure(self, part: str, scale: float = 1.0):
        """Count the FLOPs inside the block, add `count * scale` to the total under `part`."""
        if not self.enabled:
            yield None
            return
        segment = _Segment(part, scale)
        segment.start()
        self._open.append(segment)
        try:
            yield None
        finally:
            self._open.pop()
            if segment.counter is not None:
                segment.stop()
        self.add(part, segment.flops * scale)

    @contextlib.contextmanager
    def sampled_pass(self):
        """A pass over batches whose FLOPs are linear in the samples (a no-grad feature pass, or training steps
        of one fixed model): inside `measure`, only the first batch runs under the counter and its FLOPs are
        scaled by the pass's samples, added to the part being measured; the rest runs at full speed.

            with run.flops.sampled_pass() as sample:
                for batch in loader:
                    with sample(len(batch)):
                        ...  # the batch's work

        The count equals the exact one whenever every sample costs the same (a last, smaller batch included:
        the FLOPs of these ops are proportional to the batch size); work outside the `sample` blocks is not
        counted. Outside `measure`, or when another dispatch mode was entered inside it, nothing changes: the
        work is counted exactly, as before.
        """
        segment = self._open[-1] if self._open else None
        if segment is None or not segment.on_top():
            yield SampledPass(measured=False)
            return
        segment.stop()  # pause the exact count of the enclosing hook
        sample = SampledPass(measured=True)
        try:
            yield sample
        finally:
            segment.flops += sample.flops
            segment.start()

    def add(self, part: str, flops: float) -> None:
        if not self.enabled:  # not measured is no part at all, never a count of 0
            return
        self.total += flops
        self.by_part[part] = self.by_part.get(part, 0.0) + flops

    @property
    def measured_total(self) -> float | None:
        """The total, or None when counting is off (eval.flops=false): not measured, never 0."""
        return self.total if self.enabled else None

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


def write_fvcore_table(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path,
                       write: Callable[[str, Path], None] | None = None) -> float | None:
    """Write fvcore's per-module forward FLOP table (multiply-adds) for one batch; return its total x 2
    per sample, or None (with a warning in the log and the reason in the file) when tracing fails. `write(text,
    path)` writes the file (the run passes its atomic writer); its errors (a full disk) are its own, never taken
    for a tracing failure."""
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
        text = (f"# fvcore forward FLOP table for one batch of {batch_size} (fvcore counts multiply-adds;\n"
                f"# x2 = {2 * total / batch_size:.4g} FLOPs per sample, to compare with flops/forward_per_sample;\n"
                "# fvcore also counts normalisation layers, which flops/* leave out)\n" + table + "\n")
        per_sample = 2.0 * total / batch_size
    except Exception as exc:  # fvcore relies on TorchScript tracing, which some modules do not support
        log.warning("fvcore could not trace the model (%s); %s records why", exc, path.name)
        text, per_sample = f"fvcore tracing failed: {type(exc).__name__}: {exc}\n", None
    (write or (lambda t, p: p.write_text(t)))(text, path)
    return per_sample
