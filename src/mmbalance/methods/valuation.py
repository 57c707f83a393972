"""Sample-level modality valuation (Wei, Feng, Lin, Hu: "Enhancing Multimodal Cooperation via Sample-level
Modality Valuation", CVPR 2024)."""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat, Range
from mmbalance.engine.evaluation import eval_mode
from mmbalance.errors import UserError
from mmbalance.methods.base import Method, refuse_inactive_options
from mmbalance.metrics.shapley import coalitions
from mmbalance.models.multimodal import Output, mask_modalities

log = logging.getLogger("mmbalance")


def shapley_matrix(modalities: list[str]) -> tuple[list[frozenset[str]], Tensor]:
    """The coalitions (empty first, full last) and the (2^M, M) matrix A with phi = v @ A.

    A[S, m] = w(|S| - 1) if m in S, else -w(|S|), with w(s) = s! (M - s - 1)! / M!: the exact Shapley value
    phi_m = sum_{S not containing m} w(|S|) (v(S + m) - v(S)) written as one weight per coalition.
    """
    mods = list(modalities)
    n = len(mods)
    subsets = coalitions(mods)

    def w(s: int) -> float:
        return math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)

    a = torch.zeros(len(subsets), n, dtype=torch.float64)
    for i, s in enumerate(subsets):
        for j, m in enumerate(mods):
            if m in s:
                a[i, j] = w(len(s) - 1)
            else:
                a[i, j] = -w(len(s)) if len(s) < n else 0.0
    return subsets, a


def sample_shapley(values: Tensor, modalities: list[str]) -> Tensor:
    """Per-sample Shapley values (N, M) from per-coalition values (N, 2^M), columns in `coalitions` order."""
    _, a = shapley_matrix(modalities)
    return values.double() @ a


def coalition_values(correct: Tensor, full_value: float) -> Tensor:
    """v(S) per sample from per-coalition correctness (N, 2^M), `coalitions` order: v(empty) = 0 (the
    official convention, not the prediction on zeroed features), v(S) = 1[correct] for the partial coalitions,
    v(full) = full_value * 1[correct]."""
    v = correct.double().clone()
    v[:, 0] = 0.0
    v[:, -1] = v[:, -1] * full_value
    return v


def copy_counts(phi: Tensor, thresholds: tuple[float, float, float] = (1.0, 0.4, -0.1)) -> Tensor:
    """Extra copies per (sample, modality) from phi, with thresholds (t0, t1, t2) = (1, 0.4, -0.1):
    phi >= t0 -> 0; t1 < phi < t0 -> 1; t2 < phi <= t1 -> 2; phi <= t2 -> 3.

    The official table uses strict inequalities on both sides, leaving phi = 0.4 and phi = -0.1 without a
    rule; they fall to the lower bracket here. With the official value scale (values multiples of 1/2 for
    M = 2, of 1/6 for M = 3) phi never equals either.
    """
    t0, t1, t2 = thresholds
    counts = torch.full(phi.shape, 3, dtype=torch.long, device=phi.device)
    counts = torch.where(phi > t2, torch.full_like(counts, 2), counts)
    counts = torch.where(phi > t1, torch.full_like(counts, 1), counts)
    return torch.where(phi >= t0, torch.zeros_like(counts), counts)


def modality_level_copies(phi_subset: Tensor, alpha: float) -> Tensor:
    """(M,) number-of-copies fractions of N for the modality-level variant.

    gap_m = 1 - mean phi_m over the drawn subset; modality m gets (gap_m - min_k gap_k) * (2/3) * alpha * N
    copies that keep only m. For two modalities this is the official rule: the weaker modality (larger gap)
    gets int(|gap_a - gap_v| * 2/3 * alpha * N) copies with the other one dropped, the stronger none. For
    three or more every modality behind the strongest gets copies in proportion to how far behind it is
    (our generalisation; the peer instead adds, per drawn sample, one copy per modality plus full copies).
    """
    gap = 1.0 - phi_subset.double().mean(dim=0)
    return (gap - gap.min()) * (2.0 / 3.0) * alpha


class ValuationDataset(Dataset):
    """The original training set followed by extra copies; copy j is sample `source[j]` with every modality
    except `keep[j]` marked absent. Originals are marked with nothing absent. Indices stay the originals'."""

    def __init__(self, base: Dataset, source: Tensor, keep: Tensor, modalities: list[str]):
        self.base = base
        self.source = source.long().cpu()
        self.keep = keep.long().cpu()
        self.modalities = list(modalities)

    def __len__(self) -> int:
        return len(self.base) + len(self.source)

    def __getitem__(self, i: int) -> dict:
        n = len(self.base)
        if i < n:
            item = dict(self.base[i])
            item["absent"] = {m: False for m in self.modalities}
            return item
        j = i - n
        item = dict(self.base[int(self.source[j])])
        kept = self.modalities[int(self.keep[j])]
        item["absent"] = {m: m != kept for m in self.modalities}
        return item


class Valuation(Method):
    """Sample-level modality valuation ("Valuate & Enhance", Wei et al., CVPR 2024), following the official
    code (GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, `sample_level.py`, `modality_level.py`).

    Epochs before `warmup` train on the original training set. At the start of every later epoch (i.e. after
    the previous epoch's training, with the model as it ended, as the official code):
      1. Valuation pass over the ORIGINAL training set (kept from `setup`; never validation or test data):
         unshuffled, eval mode, no grad; encoders once, then the fusion head on every non-empty coalition
         with the other modalities' pooled features zeroed (`mask_modalities`, bias kept).
      2. v(S) = 1[prediction of S correct], v(empty) = 0, v(full) = `full_value` * 1[correct]; the exact
         per-sample Shapley value phi (N, M) over all 2^M coalitions (`sample_shapley`, one matmul).
         Official v(full) = 2 for two modalities: a sample that every coalition gets right has phi_m = 1 per
         modality (the fair share of a total of 2), and the copy thresholds are set on that scale. The same
         meaning for M modalities is v(full) = M (default `full_value: null`), so a fully correct sample still
         gets phi_m = 1 and no copies (with a literal 2 and M = 3 it gets 2/3 and one copy per modality). The
         peer (BalanceMM) uses v(full) = 1, which oversamples much more; `full_value: 1` reproduces it.
      3. Rebuild the training set: the originals plus extra copies of (sample i, modality m) pairs, in which
         the other modalities are marked absent (`ValuationDataset`, `Batch.absent`), and
         `run.train_loader = run.make_loader(...)`.
         - variant "sample": `copy_counts(phi)` copies per pair (0 if phi >= 1, 1 if 0.4 < phi < 1,
           2 if -0.1 < phi <= 0.4, 3 below).
         - variant "modality": phi of a random `part_ratio` of the samples (drawn with replacement, as the
           official np.random.choice); per modality int(`modality_level_copies` * N) random samples (with
           replacement) keeping only that modality.
    Training step (`forward`): encode, zero the absent modalities' pooled features per sample
    (`mask_modalities(features, batch.absent)`), fuse; the loss is the plain fused CE. As the official code,
    the dropped modality's encoder still runs on the copy (its output is zeroed, so it gets no gradient), and
    in train mode BatchNorm sees the copies' real inputs.

    Cost: the valuation pass runs in `on_epoch_start` (encoders once per sample, the head 2^M - 1 times) and is
    counted on its first batch, scaled by the samples, through one loader kept across epochs; the re-sampled
    training set is a new dataset each epoch, so its training loader is rebuilt. The larger epoch is counted
    because the trainer scales the step FLOPs by the samples processed. The modality-level variant values only
    its drawn subset (the official code values every sample and then uses only the subset; phi of a sample does
    not depend on the others in eval mode, so the result is the same).

    Args:
        variant: "sample" (the paper's main method, default) or "modality".
        warmup: epochs trained on the original set (official 5; the peer 1).
        full_value: v(full) for a correct sample; null = M (official 2 for two modalities), 1 = the peer.
        thresholds: (t0, t1, t2) of the sample-level copy table (official 1, 0.4, -0.1).
        alpha: modality-level scale (official 1; the 'linear' variant).
        part_ratio: modality-level share of samples valued (official 0.2).

    Hooks used: `setup` (keeps the original training set; in a hybrid, without any part's held-out samples,
    which every part's `hold_out` removes before any `setup`), `on_epoch_start` (valuation, rebuild), `forward`.
    Choices: feature-level zeroing in the valuation and the copies (official; the peer zeroes inputs, which
    costs 2^M - 1 encoder passes); every sample is valued (the peer drops the last N mod 64); the rebuilt
    loader uses the run's batch settings (the peer hard-codes 64); modality-level copies keep only the weak
    modality and add no full copies (official; the peer adds both).
    """

    family = "data"
    regression_refusal = ("its per-sample Shapley values score each coalition's prediction as correct or not "
                          "(argmax == label)")

    def __init__(
        self,
        variant: Literal["sample", "modality"] = "sample",
        warmup: NonNegativeInt = 5,
        full_value: PositiveFloat | None = None,
        thresholds: tuple[float, float, float] = (1.0, 0.4, -0.1),
        alpha: NonNegativeFloat = 1.0,
        part_ratio: Annotated[float, Range(gt=0, le=1)] = 0.2,
    ):
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != 3 or not thresholds[0] >= thresholds[1] >= thresholds[2]:
            raise UserError(f"method.thresholds={list(thresholds)}; expected three decreasing numbers (t0, t1, t2)")
        refuse_inactive_options(Valuation, {"alpha": alpha, "part_ratio": part_ratio}, "variant", variant, "modality")
        refuse_inactive_options(Valuation, {"thresholds": thresholds}, "variant", variant, "sample")
        self.variant = variant
        self.warmup = warmup
        self.full_value = full_value
        self.thresholds = thresholds
        self.alpha = alpha
        self.part_ratio = part_ratio
        self.train_dataset: Dataset | None = None
        self.history: list[dict] = []

    def setup(self, run):
        super().setup(run)
        self.train_dataset = run.train_loader.dataset  # the original training set, wrapped every epoch
        epochs = ((run.config or {}).get("trainer") or {}).get("epochs")
        if epochs is not None and self.warmup >= epochs:
            log.warning("valuation: warm-up (%d epochs) covers the whole run (%d epochs); no epoch is re-sampled "
                        "and this run trains exactly like the baseline. Lower method.warmup.", self.warmup, epochs)

    # ---- data stage ----
    def on_epoch_start(self, run, epoch):
        if epoch < self.warmup:
            return
        generator = torch.Generator().manual_seed(run.seed * 1_000_003 + 104_729 + epoch)  # resumes redraw alike
        n = len(self.train_dataset)
        mods = list(run.model.modalities)
        if self.variant == "sample":
            phi = self.contributions(run, self.train_dataset)
            counts = copy_counts(phi, self.thresholds)  # (N, M)
            pairs = torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten().cpu())
            source, keep = pairs // len(mods), pairs % len(mods)
        else:
            subset = torch.randint(0, n, (max(1, int(self.part_ratio * n)),), generator=generator)
            phi = self.contributions(run, self.train_dataset, subset.tolist())
            per_mod = [int(f * n) for f in modality_level_copies(phi, self.alpha).tolist()]
            source = torch.randint(0, n, (sum(per_mod),), generator=generator)
            keep = torch.repeat_interleave(torch.arange(len(mods)), torch.tensor(per_mod, dtype=torch.long))
        run.train_loader = run.make_loader(ValuationDataset(self.train_dataset, source, keep, mods), train=True)
        copies = torch.bincount(keep, minlength=len(mods)).tolist()
        mean_phi = phi.mean(0).tolist()
        self.history.append({"epoch": epoch, "phi": mean_phi, "copies": copies})
        log.info("valuation before epoch %d: mean phi %s; extra copies %s (%d originals)", epoch,
                 "  ".join(f"{m} {p:.3f}" for m, p in zip(mods, mean_phi)),
                 "  ".join(f"{m} {c}" for m, c in zip(mods, copies)), n)

    @torch.no_grad()
    def contributions(self, run, dataset: Dataset, indices: list[int] | None = None) -> Tensor:
        """Per-sample Shapley values (N, M) of `dataset`, or of its samples `indices` in that order (unshuffled,
        eval mode, feature-level coalitions). One loader is kept across epochs (`run.loader`); the FLOPs are
        counted on the first batch and scaled by the samples (`FlopMeter.sampled_pass`)."""
        model = run.model
        mods = list(model.modalities)
        subsets = coalitions(mods)
        full_value = float(len(mods)) if self.full_value is None else float(self.full_value)
        correct = []
        loader = run.loader("valuation/values", dataset, train=False, indices=indices)
        with eval_mode(model), run.flops.sampled_pass() as sample:
            for batch in loader:
                batch = batch.to(run.device, non_blocking=True)
                with sample(len(batch)), run.autocast():
                    z = model.encode(batch.inputs)
                    hits = [torch.zeros_like(batch.label, dtype=torch.bool)]  # v(empty) = 0, not evaluated
                    for s in subsets[1:]:
                        logits = self.eval_fuse(run, mask_modalities(z, [m for m in mods if m not in s]))[0]
                        hits.append(logits.argmax(dim=1) == batch.label)
                correct.append(torch.stack(hits, dim=1).cpu())
        return sample_shapley(coalition_values(torch.cat(correct), full_value), mods).float()

    # ---- forward stage ----
    def forward(self, run, batch):
        model = run.model
        z = model.encode(batch.inputs)
        if batch.absent is not None:
            z = mask_modalities(z, batch.absent)
        return Output(model.fuse(z), z, fusion=model.fusion)

    # ---- resume ----
    def state_dict(self):
        state = super().state_dict()
        state["history"] = list(self.history)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.history = list(state.get("history", []))
