"""FLOPs: the counter against hand-computed counts, and a run's total against its measured steps."""

import contextlib

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


# ---------------------------------------------------------------- sampled passes (epoch hooks' batch loops)

def _pass(meter, layer, batches, depths=None):
    with meter.sampled_pass() as sample:
        for x in batches:
            with sample(len(x)):
                if depths is not None:
                    depths.append(torch._C._len_torch_dispatch_stack())
                layer(x)


def test_sampled_pass_equals_the_exact_count_and_runs_only_its_first_batch_under_the_counter():
    layer = nn.Linear(8, 5, bias=False)
    batches = list(torch.randn(10, 8).split(4))  # 4, 4 and a last, smaller batch of 2
    exact = FlopMeter()
    with exact.measure("hooks"):
        layer(torch.randn(3, 8))  # work outside the pass is counted exactly in both
        for x in batches:
            layer(x)
    sampled, depths = FlopMeter(), []
    with sampled.measure("hooks"):
        layer(torch.randn(3, 8))
        _pass(sampled, layer, batches, depths)
    # a linear layer's FLOPs are proportional to the batch, so scaling the first batch by the samples is exact,
    # the last partial batch included
    assert sampled.by_part == exact.by_part == {"hooks": 2 * 13 * 8 * 5}
    assert depths == [1, 0, 0]  # the first batch under the counter, the rest under no dispatch mode at all


def test_sampled_pass_outside_a_measurement_or_under_another_mode_counts_as_before():
    layer = nn.Linear(8, 5, bias=False)
    batches = list(torch.randn(10, 8).split(4))
    meter = FlopMeter()
    _pass(meter, layer, batches)  # nothing is being measured: nothing is added
    assert meter.total == 0 and meter.by_part == {}
    off = FlopMeter(enabled=False)
    with off.measure("hooks"):
        _pass(off, layer, batches)
    assert off.total == 0
    # another counter entered inside the measurement: the pass is not sampled, both count it exactly
    with meter.measure("hooks"):
        _, inner = count_flops(_pass, meter, layer, batches)
    assert inner == meter.by_part["hooks"] == 2 * 10 * 8 * 5
    # an error inside the first batch leaves no counter behind and the measurement goes on
    with pytest.raises(RuntimeError), meter.measure("broken"):
        with meter.sampled_pass() as sample, sample(4):
            raise RuntimeError("boom")
    assert torch._C._len_torch_dispatch_stack() == 0


def _exact_passes(monkeypatch):
    """Count every declared pass exactly (the reference: how epoch hooks were counted before)."""
    from mmbalance.metrics.flops import SampledPass

    @contextlib.contextmanager
    def exact(self):
        yield SampledPass(measured=False)

    monkeypatch.setattr(FlopMeter, "sampled_pass", exact)


HOOKS = {  # method overrides, and the epoch hook that runs a pass
    "pmr": ([], lambda run: run.method.on_epoch_end(run, 0)),
    "relearning": (["method.reinit_epoch=1", "method.reinit_num=1", "method.kmeans_n_init=1"],
                   lambda run: run.method.on_epoch_start(run, 2)),
    "valuation": (["method.warmup=0"], lambda run: run.method.on_epoch_start(run, 0)),
    "valuation_modality": (["method=valuation", "method.warmup=0", "method.variant=modality"],
                           lambda run: run.method.on_epoch_start(run, 0)),
    "gblending": ([], lambda run: run.method.on_epoch_start(run, 0)),
    "gblending_trial": (["method=gblending", "method.estimator=trial", "method.super_epoch=1"],
                        lambda run: run.method.on_epoch_start(run, 0)),
}


@pytest.mark.parametrize("case", sorted(HOOKS))
def test_epoch_hook_flops_sampled_equal_the_exact_count(case, monkeypatch):
    """The synthetic training split (about 65 samples, batches of 16) ends with a smaller batch."""
    from conftest import compose_cfg
    from test_methods import make_run

    overrides, hook = HOOKS[case]
    cfg = compose_cfg(overrides if overrides and overrides[0].startswith("method=") else [f"method={case}", *overrides])
    counts, weights, passes = {}, {}, []
    for mode in ("exact", "sampled"):
        with monkeypatch.context() as patch:
            if mode == "exact":
                _exact_passes(patch)
            else:  # record that the passes were sampled, not counted in full
                original = FlopMeter.sampled_pass

                @contextlib.contextmanager
                def recorded(self):
                    with original(self) as sample:
                        yield sample
                    passes.append(sample.measured)

                patch.setattr(FlopMeter, "sampled_pass", recorded)
            run = make_run(cfg)
            passes.clear()  # setup's passes ran outside a measurement
            with run.flops.measure("method_epoch_hooks"):
                hook(run)
        counts[mode] = run.flops.by_part["method_epoch_hooks"]
        weights[mode] = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert passes and all(passes)
    assert counts["sampled"] > 0 and counts["sampled"] == pytest.approx(counts["exact"], rel=1e-9)
    for k in weights["exact"]:  # sampling changes the count, not the computation
        torch.testing.assert_close(weights["sampled"][k], weights["exact"][k], rtol=0, atol=0)
