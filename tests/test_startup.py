"""Start-up stays light, and the plain-tensor accuracy and macro-F1 keep their definitions.

Importing the training recipe must not load libraries a run does not use at import (issue 14: torchmetrics
alone cost 2.8 s of a 5 s import for two metrics). The metrics are exact tensor arithmetic; where torchmetrics
is installed they are checked against it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmbalance.metrics.classification import accuracy, macro_f1, per_class_f1

# loaded only by the code that uses them (fvcore: the FLOP table after training; timm/transformers: pretrained
# encoders; matplotlib/pandas: reports; sklearn, torchaudio, av: datasets that decode media or use them)
NOT_AT_IMPORT = ("torchmetrics", "fvcore", "timm", "transformers", "matplotlib", "pandas", "sklearn", "torchaudio",
                 "av")


@pytest.mark.parametrize("module", ["mmbalance.train", "mmbalance.engine.evaluation", "mmbalance.data.batch"])
def test_import_loads_no_library_the_import_does_not_need(module):
    code = (f"import sys, {module}; "
            f"print(','.join(sorted(m for m in {NOT_AT_IMPORT!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.strip()
    assert loaded == "", f"importing {module} loads {loaded}"


# ---- hand-checked examples ---------------------------------------------------------------------------------

def test_macro_f1_counts_a_class_absent_from_targets_and_predictions_as_zero():
    # 4 classes; class 3 has no support and is never predicted.
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1 -> 4/5; class 2: TP 1, FN 1 -> 2/3; class 3: 0
    expected = [0.5, 0.8, 2 / 3, 0.0]
    assert per_class_f1(preds, target, 4).tolist() == pytest.approx(expected)
    assert macro_f1(preds, target, 4) == pytest.approx(sum(expected) / 4)  # 0.4917, not 1.9667 / 3
    assert accuracy(preds, target, 4) == pytest.approx(4 / 6)


def test_macro_f1_a_predicted_class_without_support_scores_zero():
    target = torch.tensor([0, 0, 1, 1])
    preds = torch.tensor([0, 2, 1, 1])  # class 2: no support, one false positive
    # class 0: TP 1, FN 1 -> 2/3; class 1: 1; class 2: 0
    assert per_class_f1(preds, target, 3).tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert macro_f1(preds, target, 3) == pytest.approx(5 / 9)
    assert accuracy(preds, target, 3) == pytest.approx(3 / 4)


def test_metrics_accept_logits_and_edge_cases():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.9], [0.0, 0.0, 1.0]])
    target = torch.tensor([0, 1, 1, 2])
    labels = logits.argmax(1)
    assert accuracy(logits, target, 3) == accuracy(labels, target, 3) == pytest.approx(0.75)
    assert macro_f1(logits, target, 3) == macro_f1(labels, target, 3)
    perfect = torch.tensor([0, 1, 2, 2])
    assert macro_f1(perfect, perfect, 3) == pytest.approx(1.0)
    assert macro_f1(perfect, perfect, 5) == pytest.approx(3 / 5)  # two unseen classes count as 0
    assert accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3) == 0.0
    assert macro_f1(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3) == 0.0
    with pytest.raises(ValueError, match="class indices"):
        macro_f1(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)


# ---- against torchmetrics, where it is installed -----------------------------------------------------------

def test_metrics_equal_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        k = int(torch.randint(2, 9, (1,), generator=gen))
        n = int(torch.randint(1, 60, (1,), generator=gen))
        target = torch.randint(0, k, (n,), generator=gen)
        if trial % 3 == 0:  # logits, and some classes never occur
            scores = torch.randn(n, k, generator=gen)
            target = target % max(1, k - 2)
        else:
            scores = torch.randint(0, k, (n,), generator=gen)
        ours_acc, ours_f1 = accuracy(scores, target, k), macro_f1(scores, target, k)
        ref_acc = float(tm.multiclass_accuracy(scores, target, num_classes=k, average="micro"))
        ref_per_class = tm.multiclass_f1_score(scores, target, num_classes=k, average="none", zero_division=0)
        assert ours_acc == pytest.approx(ref_acc, abs=1e-6)
        assert ours_f1 == pytest.approx(float(ref_per_class.mean()), abs=1e-6)
        assert per_class_f1(scores, target, k).tolist() == pytest.approx(ref_per_class.tolist(), abs=1e-6)


def test_macro_convention_against_torchmetrics_macro():
    """torchmetrics' average="macro" leaves out a class with TP + FP + FN = 0; ours counts it as 0 (over ALL
    classes, the settled choice). Where every class occurs in targets or predictions the two agree."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    tm_macro = float(tm.multiclass_f1_score(preds, target, num_classes=4, average="macro"))
    assert tm_macro == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(preds, target, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 4)
    assert macro_f1(preds, target, 3) == pytest.approx(
        float(tm.multiclass_f1_score(preds, target, num_classes=3, average="macro")))
    # a predicted class without support: FP > 0, so torchmetrics' macro keeps it (as 0) too
    t2, p2 = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1])
    assert macro_f1(p2, t2, 3) == pytest.approx(float(tm.multiclass_f1_score(p2, t2, num_classes=3, average="macro")))
