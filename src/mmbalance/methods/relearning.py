"""Diagnosing & Re-learning (Wei, Li, Hu: "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

from mmbalance.constraints import NonNegativeFloat, NonNegativeInt, PositiveInt
from mmbalance.engine.evaluation import collect_features
from mmbalance.methods.base import Method

log = logging.getLogger("mmbalance")


def relearn_due(epoch: int, every: int, done: int, times: int) -> bool:
    """Whether re-learning runs at the start of `epoch` (0-based).

    The official code re-learns after training (and evaluating) epoch e when e % every == 0 and e > 0, at
    most `times` times; we run it at the start of epoch e + 1, which is the same point in training (the
    model validated and checkpointed at epoch e is the one before re-initialisation, as in the official code).
    With every = 20, times = 3 that is before epochs 21, 41, 61.
    """
    previous = epoch - 1
    return previous > 0 and previous % every == 0 and done < times


def min_max_scale(x: Tensor) -> Tensor:
    """Per-column scaling to [-1, 1] (scikit-learn's MinMaxScaler(feature_range=(-1, 1)); a constant column,
    whose range sklearn treats as 1, maps to -1)."""
    lo, hi = x.min(0).values, x.max(0).values
    span = hi - lo
    span = torch.where(span == 0, torch.ones_like(span), span)
    return (x - lo) * (2.0 / span) - 1.0


def cluster_purity(clusters: Tensor, labels: Tensor, num_clusters: int, num_classes: int) -> float:
    """Accuracy after labelling each cluster with its majority true label: sum_k max_c n_kc / N."""
    counts = torch.bincount(clusters.long() * num_classes + labels.long(), minlength=num_clusters * num_classes)
    return float(counts.view(num_clusters, num_classes).max(1).values.sum()) / max(len(labels), 1)


def kmeans_purity(features: Tensor, labels: Tensor, num_classes: int, n_init: int, seed: int) -> float:
    """Min-max scale (fitted on this split), KMeans with k = number of classes, then cluster purity."""
    from sklearn.cluster import KMeans

    x = min_max_scale(features.double()).numpy()
    k = min(num_classes, len(x))
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    return cluster_purity(torch.from_numpy(np.asarray(clusters)), labels, k, num_classes)


def reinit_strength(gap: float, lam: float) -> float:
    """s = tanh(lambda * gap)."""
    return math.tanh(lam * gap)


@torch.no_grad()
def soft_reinit_(params: list[Tensor], initial: list[Tensor], strength: float) -> None:
    """theta <- s * theta_0 + (1 - s) * theta, in place (the official blend)."""
    for p, p0 in zip(params, initial):
        p.mul_(1.0 - strength).add_(p0.to(device=p.device, dtype=p.dtype), alpha=strength)


class Relearning(Method):
    """Diagnosing & Re-learning (Wei, Li, Hu, ECCV 2024), as the official code
    (GeWu-Lab/Diagnosing_Relearning_ECCV2024, `code/ours.py`) does it.

    Training is plain fused cross-entropy. Every `reinit_epoch` epochs, at most `reinit_num` times, each
    encoder is diagnosed: pooled features of the whole training split and of the validation split (eval mode,
    no grad), each split min-max scaled to [-1, 1] on its own, KMeans with k = number of classes, purity =
    accuracy after majority relabelling; gap_m = |purity_train - purity_val| and that encoder's parameters
    are softly re-initialised toward their snapshot taken in `setup`: theta <- s theta_0 + (1 - s) theta with
    s = tanh(lambda * gap_m). The fusion head and buffers (BatchNorm statistics) are not touched.

    Args:
        move_lambda: lambda in s = tanh(lambda * gap) (official 3).
        reinit_epoch: R; re-learn after 0-based epoch e when e % R == 0 and e > 0 (official 20).
        reinit_num: at most this many re-learning events (official 3).
        kmeans_n_init, kmeans_seed: pinned KMeans restarts and seed. The official code used sklearn's default
            n_init of its time (10; newer sklearn defaults to "auto" = 1 run, which changes purity) and
            random_state 0.
        reset_momentum: also drop the optimizer state (momentum buffers) of the re-initialised parameters.
            Off by default: the official code does not reset it.

    Hooks used: `setup` (theta_0 snapshot), `on_epoch_start` (diagnosis and re-initialisation).
    Choices: the validation split is the run's own (carved from training data, or the dataset's), never the
    test split — the peer (BalanceMM) uses the test set as "val" on datasets without one, and re-initialises
    before validating; we re-initialise after that epoch's validation, at the start of the next epoch, as the
    official code (which re-initialises after its per-epoch evaluation). The training-set features come from
    an unshuffled loader over the training dataset (its own transforms), as the official code. The peer's
    settings (reinit_epoch 15, reinit_num 2) are not the default. The KMeans fits run on CPU in
    scikit-learn and are not in the FLOPs count; the feature passes are (they run inside an epoch hook; the
    first batch is counted and scaled by the samples, `FlopMeter.sampled_pass`).
    """

    family = "optimization"
    regression_refusal = ("its diagnosis is the k-means cluster purity of each encoder's features against the "
                          "class labels")

    def __init__(
        self,
        move_lambda: NonNegativeFloat = 3.0,
        reinit_epoch: PositiveInt = 20,
        reinit_num: NonNegativeInt = 3,
        kmeans_n_init: PositiveInt = 10,
        kmeans_seed: NonNegativeInt = 0,
        reset_momentum: bool = False,
    ):
        self.move_lambda = move_lambda
        self.reinit_epoch = reinit_epoch
        self.reinit_num = reinit_num
        self.kmeans_n_init = kmeans_n_init
        self.kmeans_seed = kmeans_seed
        self.reset_momentum = reset_momentum
        self.done = 0
        self.initial: dict[str, list[Tensor]] = {}
        self.events: list[dict] = []

    def setup(self, run):
        super().setup(run)
        # theta_0: taken before any step (a resume then overwrites it with the saved snapshot)
        self.initial = {m: [p.detach().clone() for p in ps] for m, ps in run.model.modality_parameters().items()}
        epochs = ((run.config or {}).get("trainer") or {}).get("epochs")
        if epochs is not None and (self.reinit_num == 0 or self.reinit_epoch + 1 >= epochs):
            # say so loudly: without an event this run is exactly the baseline
            log.warning("relearning: no re-learning event fits in %d epochs (every %d epochs, at most %d times); "
                        "this run trains exactly like the baseline. Lower method.reinit_epoch.",
                        epochs, self.reinit_epoch, self.reinit_num)

    def on_epoch_start(self, run, epoch):
        if relearn_due(epoch, self.reinit_epoch, self.done, self.reinit_num):
            self.relearn(run, epoch)

    @staticmethod
    def extract(run, loader) -> tuple[dict[str, Tensor], Tensor]:
        """Pooled features of every modality and the labels over a whole loader, on the CPU for scikit-learn."""
        feats, labels = collect_features(run, loader)
        return {m: z.cpu() for m, z in feats.items()}, labels.cpu()

    def relearn(self, run, epoch: int) -> dict[str, dict[str, float]]:
        train_loader = run.loader("relearning/train_features", run.train_loader.dataset, train=False)
        train_z, train_y = self.extract(run, train_loader)
        val_z, val_y = self.extract(run, run.val_loader)
        params = run.model.modality_parameters()
        event: dict[str, dict[str, float]] = {}
        for m in run.model.modalities:
            p_train = kmeans_purity(train_z[m], train_y, run.num_classes, self.kmeans_n_init, self.kmeans_seed)
            p_val = kmeans_purity(val_z[m], val_y, run.num_classes, self.kmeans_n_init, self.kmeans_seed)
            gap = abs(p_train - p_val)
            s = reinit_strength(gap, self.move_lambda)
            soft_reinit_(params[m], self.initial[m], s)
            if self.reset_momentum:
                for p in params[m]:
                    run.optimizer.state.pop(p, None)
            event[m] = {"purity_train": p_train, "purity_val": p_val, "gap": gap, "strength": s}
        self.done += 1
        self.events.append({"epoch": epoch, **event})
        summary = "  ".join(f"{m} purity train {v['purity_train']:.3f} val {v['purity_val']:.3f} s={v['strength']:.3f}"
                            for m, v in event.items())
        log.info("re-learning %d/%d before epoch %d: %s", self.done, self.reinit_num, epoch, summary)
        return event

    def state_dict(self):
        state = super().state_dict()
        state.update(done=self.done, initial={m: list(ps) for m, ps in self.initial.items()},
                     events=list(self.events))
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.done = state["done"]
        self.events = list(state.get("events", []))
        self.initial = {m: [p.detach().clone() for p in ps] for m, ps in state["initial"].items()}
