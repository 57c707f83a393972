"""FLOPs: the counter against hand-computed counts, and a run's total against its measured steps."""

import pytest
import torch
from torch import nn

from mmbalance.metrics.flops import FlopMeter, count_flops, write_fvcore_table

from helpers import inputs


def test_linear_forward_is_2_b_din_dout_and_backward_twice_that():
    layer = nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 8)
    _, fwd = count_flops(layer, x)
    assert fwd == 2 * 3 * 8 * 5
    _, both = count_flops(lambda: layer(x).sum().backward())
    # backward: grad wrt weight only (x needs no grad) = one more matmul of the same size
    assert both == 2 * fwd


def test_meter_accumulates_parts_and_round_trips():
    meter = FlopMeter()
    layer = nn.Linear(4, 4, bias=False)
    with meter.measure("a", scale=3):
        layer(torch.randn(2, 4))
    meter.add("b", 10)
    assert meter.total == 3 * 2 * 2 * 4 * 4 + 10 and meter.by_part == {"a": 192, "b": 10}
    other = FlopMeter()
    other.load_state_dict(meter.state_dict())
    assert other.total == meter.total


class _Plain(nn.Linear):
    @property
    def out_dim(self):
        return self.out_features


def test_fvcore_table_total_times_two_matches_the_counter(tmp_path):
    # fvcore also counts normalisation layers, which FlopCounterMode leaves out, so compare without them
    from mmbalance.models.fusion import build_fusion
    from mmbalance.models.multimodal import MultimodalModel

    model = MultimodalModel({"a": _Plain(5, 4), "b": _Plain(5, 6)}, build_fusion("concat", {"a": 4, "b": 6}, 3)).eval()
    x = inputs(("a", "b"), n=4)
    with torch.no_grad():
        _, ours = count_flops(lambda: model.fuse(model.encode(x)))
    per_sample = write_fvcore_table(model, x, tmp_path / "t.txt")
    assert per_sample == pytest.approx(ours / 4, rel=0.02) and ours / 4 == 2 * (5 * 4 + 5 * 6 + 10 * 3)
    assert "encoders.a" in (tmp_path / "t.txt").read_text()


def test_fused_cpu_attention_is_counted():
    """BERT and timm's ViT dispatch to torch's fused CPU attention, which has no formula in torch itself."""
    q = torch.randn(2, 4, 16, 8, requires_grad=True)  # (batch, heads, tokens, head dim)
    out, forward = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert forward == 2 * (2 * 4 * 16 * 16 * 8) * 2  # QK^T and AV, 2 FLOPs per multiply-add
    _, backward = count_flops(lambda: out.sum().backward())
    assert backward == 2.5 * forward
