"""TargetInInputCheck: is a feature the label itself, or a near-exact function of it?"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._validate import check_int, check_number
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity

#: a target with at most this many distinct (integral) values is judged as classes
MAX_CLASSES = 64
#: per-sample targets with more values than this (sequences, images) are not judged
MAX_TARGETS = 16
#: feature columns judged at most (wider inputs are flattened images or embeddings)
MAX_FEATURES = 4096
#: feature pairs are searched for a product / ratio with the target up to this many columns
MAX_PAIR_FEATURES = 64
#: fewest labels outside the largest class before a feature can be called the label
MIN_MINORITY = 8


class TargetInInputCheck(FirstBatchCheck):
    """Look for the label among the input features ("become one with the data").

    A table that keeps the label column among the features, or a feature computed from the
    target (a ratio such as price per square foot when the price is the target, a bucketed
    target), gives validation metrics far beyond what the data allows, and nothing fails.
    On the first training batches (up to ``num_samples`` samples, ``num_batches`` batches) this
    check compares every column of a tabular input ``(N, F)`` with every per-sample target:

    * classes (an integer target, or one with few integral values): a feature whose values and
      the classes determine each other -- looking up the class from the feature value and the
      feature value from the class are both right for at least ``1 - tolerance`` of the samples
      (0.99 by default), with at least 8 labels outside the largest class. A feature that is
      strongly but not exactly tied to the class (its values vary within a class) is healthy.
    * a continuous target: a feature that is an affine function of it (``1 - r^2`` below
      ``1e-6``), an exactly monotone one (sorted by the target, the feature never steps back:
      ``log(price)``, a bucketed price with 4+ buckets), or, with 3 to 64 columns, a feature that
      makes the target exact together with one other column through their product or ratio
      (``y ~ 1 + f + g + f*g`` exact while ``y ~ 1 + f + g`` is not, either way round). Only
      exactness counts: a legitimately strong predictor has noise, and a sum of lagged values
      (a sine's recurrence) is left alone. A target that is by definition a product of two
      inputs looks the same as a leaked ratio; the message says so.

    Images, sequences and other inputs of more than two dimensions are not judged (per pixel
    such rules mean nothing), nor are single-feature regression inputs (fitting ``y = f(x)``).

    The limits were measured: over 3 seeds, a leaked label column, a standardised copy of a
    regression target, ``log(target)`` and ``target / other feature`` give a class agreement of
    1.0, ``1 - r^2`` < 1e-12, 0 monotonicity violations and a pair ``1 - R^2`` < 1e-12; healthy
    features correlated with the target at r = 0.99-0.999 (Gaussian noise), lag features of a
    noisy random walk and a sine, and binary features agreeing with a binary label on 95% of
    the samples give ``1 - r^2`` >= 2e-3, 3+ violations and agreements <= 0.96.

    Args:
        tolerance: share of samples that may contradict "the feature is the label" (in [0, 0.5)).
        num_samples: samples to collect before judging (>= 16).
        num_batches: most training batches to collect them from (>= 1).
        get_input, get_target, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[TargetInInputCheck()])
        trainer.fit(model, datamodule)  # "[target-in-input] Feature 7 is the label: ..."
    """

    what = "compare the features with the target"

    def __init__(
        self,
        tolerance: float = 0.01,
        num_samples: int = 512,
        num_batches: int = 8,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, on_error=on_error)
        self.tolerance = check_number("tolerance", tolerance, 0.0, 0.5, high_open=True)
        self.num_samples = check_int("num_samples", num_samples, 16)
        self.num_batches = check_int("num_batches", num_batches)
        self.batches_needed = num_batches
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self._collected = 0

    # ------------------------------------------------------------------ hooks
    def first_batches(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        if self.done:
            return
        if not self._xs and trainer.global_step > 0:
            self.done = True
            return
        try:
            collected = self._collect(batch)
        except BatchLayoutError as why:
            self.done = True
            self._release()
            self.skip(trainer, str(why))
            return
        if not collected:
            self.done = True
            self._release()
            return
        if self._collected >= self.num_samples or self._seen >= self.num_batches:
            self.done = True
            self._judge(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.done or not self._xs:
            return
        with self.rank_consistent_errors(trainer):
            self.done = True
            self.run_safely(trainer, "on_train_epoch_end", self._judge, trainer)

    def teardown_diagnostics(self) -> None:
        self._release()

    def _release(self) -> None:
        self._xs, self._ys = [], []

    # ------------------------------------------------------------------ one-shot API
    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Judge one batch (``preflight``)."""
        self._release()
        self._collected = 0
        if self._collect(batch):  # BatchLayoutError: run_check turns it into a skip
            self._judge(trainer)

    # ------------------------------------------------------------------ work
    def _collect(self, batch: Any) -> bool:
        """Keep the batch's features and targets; False when the check does not apply."""
        x = self.adapter.input(batch)
        y = self.adapter.target(batch)
        if y is None:
            self.figures["note"] = "the batch has no target"
            return False
        if x.dim() == 0 or x.dim() > 2:
            self.figures["note"] = f"input of shape {tuple(x.shape)} is not a table of features: not judged"
            return False
        n = x.shape[0]
        if y.dim() == 0 or y.shape[0] != n or y[0].numel() > MAX_TARGETS or y.is_complex() or x.is_complex():
            self.figures["note"] = f"target of shape {tuple(y.shape)} is not one value per sample: not judged"
            return False
        x = x.detach().reshape(n, -1)
        k = y[0].numel()
        if k > 1 and (not x.is_floating_point() or x.shape[1] == k):
            # a target sequence next to an input sequence (tokens, a window shifted by one) is the
            # autoregressive layout, where the input holds the targets by design
            self.figures["note"] = f"a sequence of {k} targets next to a sequence input: not judged"
            return False
        if x.shape[1] > MAX_FEATURES:
            self.figures["note"] = f"{x.shape[1]} features per sample (over {MAX_FEATURES}): not judged"
            return False
        self._xs.append(x.clone())
        self._ys.append(y.detach().reshape(n, -1).clone())
        self._collected += n
        return True

    def _judge(self, trainer: Any | None) -> None:
        self.done = True
        x = torch.cat([t.cpu() for t in self._xs]).double()
        y = torch.cat([t.cpu() for t in self._ys]).double()
        self._release()
        n, f = x.shape
        self.figures.update({"samples": n, "features": f})
        if n < 16:
            self.figures["note"] = f"only {n} samples"
            return
        finite = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
        x, y = x[finite], y[finite]
        for k in range(y.shape[1]):
            yk = y[:, k]
            values = torch.unique(yk)
            if values.numel() < 2:
                continue
            name = "the target" if y.shape[1] == 1 else f"target column {k}"
            if values.numel() <= MAX_CLASSES and bool((values == values.round()).all()):
                self._judge_classes(trainer, x, yk, name)
            elif f >= 2:
                self._judge_continuous(trainer, x, yk, name)

    # ------------------------------------------------------------------ classes
    def _judge_classes(self, trainer: Any | None, x: Tensor, y: Tensor, name: str) -> None:
        n = x.shape[0]
        _, y_idx, y_counts = torch.unique(y, return_inverse=True, return_counts=True)
        minority = n - int(y_counts.max())
        distinct = _distinct_per_column(x)
        candidates = ((distinct >= 2) & (distinct <= max(2, n // 4))).nonzero().flatten().tolist()
        best, best_j = 0.0, None
        for j in candidates:
            _, x_idx = torch.unique(x[:, j], return_inverse=True)
            agree = _mutual_lookup(x_idx, y_idx)
            if agree > best:
                best, best_j = agree, j
        self.figures[f"class_agreement ({name})"] = best
        if best_j is None or best < 1 - self.tolerance or minority < MIN_MINORITY:
            return
        self.report(
            trainer,
            "target-in-input",
            Severity.WARNING,
            f"Input feature {best_j} is {name}: on {n} training samples its value and the class "
            f"determine each other for {best:.1%} of them ({int(y_counts.numel())} classes, "
            f"{int(distinct[best_j])} feature values), so the model can read the label from its "
            "input; drop the column (a label column left in the table, or a feature computed from "
            "the label).",
            {
                "feature": best_j,
                "agreement": best,
                "samples": n,
                "classes": int(y_counts.numel()),
                "target": name,
            },
        )

    # ------------------------------------------------------------------ continuous target
    def _judge_continuous(self, trainer: Any | None, x: Tensor, y: Tensor, name: str) -> None:
        n, f = x.shape
        xs, ys = _standardise(x), _standardise(y.unsqueeze(1)).squeeze(1)
        varying = xs.abs().sum(0) > 0
        r = (xs * ys.unsqueeze(1)).mean(0)
        unexplained = torch.where(varying, 1 - r * r, torch.ones_like(r)).clamp_min(0)
        violations = _monotone_violations(x, y)
        distinct = _distinct_per_column(x)
        self.figures[f"min_1_minus_r2 ({name})"] = float(unexplained.min())
        monotone = violations.masked_fill(~varying | (distinct < 4), n)
        self.figures[f"min_monotone_violations ({name})"] = int(monotone.min())
        j = int(unexplained.argmin())
        if float(unexplained[j]) <= 1e-6:
            self._leak(
                trainer,
                name,
                f"Input feature {j} is an affine function of {name} (correlation {float(r[j]):+.7f} "
                f"on {n} training samples)",
                {"feature": j, "one_minus_r2": float(unexplained[j]), "samples": n, "target": name},
            )
            return
        allowed = int(self.tolerance * n / 10)
        for j in (monotone <= allowed).nonzero().flatten().tolist():
            _, counts = torch.unique(x[:, j], return_counts=True)
            if float(counts.max()) <= n / 2:  # not a feature that is constant but at the extremes
                break
        else:
            j = None
        if j is not None:
            self._leak(
                trainer,
                name,
                f"Input feature {j} is a monotone function of {name}: sorted by the target its "
                f"{int(distinct[j])} values never step back on {n} training samples (a log, a "
                "bucketing or a rescaling of the target)",
                {"feature": j, "violations": int(monotone[j]), "samples": n, "target": name},
            )
            return
        if 3 <= f <= MAX_PAIR_FEATURES:
            pair = _product_pair(xs, ys, varying)
            if pair is not None:
                self.figures[f"min_pair_1_minus_r2 ({name})"] = pair[2]
                if pair[2] <= 1e-6:
                    a, b, u, how = pair
                    self._leak(
                        trainer,
                        name,
                        f"Input features {a} and {b} give {name} exactly through their product or "
                        f"ratio ({how}, 1 - R^2 = {u:.1e} on {n} training samples, while neither "
                        "does alone or added): one of them was probably computed from the target "
                        "(a ratio such as price per unit); if the target is by definition such a "
                        "product, ignore this",
                        {
                            "features": [a, b],
                            "one_minus_r2": u,
                            "relation": how,
                            "samples": n,
                            "target": name,
                        },
                    )

    def _leak(self, trainer: Any | None, name: str, what: str, evidence: dict[str, Any]) -> None:
        self.report(
            trainer,
            "target-in-input",
            Severity.WARNING,
            f"{what}, so the model can read {name} from its input and the validation metrics will "
            "be far better than the data allows; drop the feature or compute it without the target.",
            evidence,
        )


# ---------------------------------------------------------------------------- statistics
def _distinct_per_column(x: Tensor) -> Tensor:
    s = x.sort(0).values
    return 1 + (s[1:] != s[:-1]).sum(0)


def _mutual_lookup(a: Tensor, b: Tensor) -> float:
    """How well two labelings determine each other: the smaller of the accuracies of predicting
    ``b`` from ``a`` and ``a`` from ``b`` by the most frequent value (both 1.0 for a bijection)."""
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    table = torch.zeros(na * nb, dtype=torch.long).index_add_(0, a * nb + b, torch.ones_like(a)).view(na, nb)
    n = a.numel()
    return min(float(table.max(1).values.sum()) / n, float(table.max(0).values.sum()) / n)


def _standardise(x: Tensor) -> Tensor:
    mean = x.mean(0, keepdim=True)
    std = x.std(0, unbiased=False, keepdim=True)
    return torch.where(std > 0, (x - mean) / std.clamp_min(1e-300), torch.zeros_like(x))


def _monotone_violations(x: Tensor, y: Tensor) -> Tensor:
    """Per column, the fewest steps back of the feature (up or down) when the samples are sorted
    by the target; pairs of samples with equal targets do not count."""
    order = torch.argsort(y, stable=True)
    ys, xs = y[order], x[order]
    step = xs[1:] - xs[:-1]
    distinct_y = (ys[1:] != ys[:-1]).unsqueeze(1)
    down = ((step < 0) & distinct_y).sum(0)
    up = ((step > 0) & distinct_y).sum(0)
    return torch.minimum(down, up)


def _unexplained(design: Tensor, target: Tensor) -> Tensor:
    """``1 - R^2`` of least squares fits: ``design`` (B, N, P), ``target`` (B, N, T) standardised."""
    sol = torch.linalg.lstsq(design, target).solution
    resid = target - design @ sol
    total = (target - target.mean(1, keepdim=True)).pow(2).sum(1)
    return (resid.pow(2).sum(1) / total.clamp_min(1e-300)).clamp_min(0)


def _product_pair(xs: Tensor, ys: Tensor, varying: Tensor) -> tuple[int, int, float, str] | None:
    """The pair of columns (f, g) that with their product explains the target best while their
    sum does not, trying ``y ~ 1 + f + g + f*g`` and ``f ~ 1 + y + g + y*g``. Returns
    ``(f, g, 1 - R^2, relation)`` or ``None``."""
    n, nf = xs.shape
    ones = torch.ones(n, dtype=xs.dtype)
    best: tuple[int, int, float, str] | None = None
    cols = [j for j in range(nf) if bool(varying[j])]
    for g in cols:
        others = [j for j in cols if j != g]
        if not others:
            continue
        o = torch.tensor(others)
        f_cols = xs[:, o].T  # (K, N)
        k = f_cols.shape[0]
        g_col = xs[:, g].expand(k, n)
        # y ~ 1 + f + g (+ f*g)
        lin = torch.stack([ones.expand(k, n), f_cols, g_col], -1)
        full = torch.cat([lin, (f_cols * g_col).unsqueeze(-1)], -1)
        target = ys.expand(k, n).unsqueeze(-1)
        u_full = _unexplained(full, target).squeeze(-1)
        u_lin = _unexplained(lin, target).squeeze(-1)
        # f ~ 1 + y + g (+ y*g), for every f at once
        lin2 = torch.stack([ones, ys, xs[:, g]], -1).unsqueeze(0)
        full2 = torch.cat([lin2, (ys * xs[:, g]).view(1, n, 1)], -1)
        u_full2 = _unexplained(full2, f_cols.T.unsqueeze(0)).squeeze(0)
        u_lin2 = _unexplained(lin2, f_cols.T.unsqueeze(0)).squeeze(0)
        for u, ul, how in ((u_full, u_lin, "target ~ f * g"), (u_full2, u_lin2, "f ~ target * g")):
            ok = ul > 1e-3
            if not bool(ok.any()):
                continue
            masked = torch.where(ok, u, torch.ones_like(u))
            i = int(masked.argmin())
            if best is None or float(masked[i]) < best[2]:
                best = (others[i], g, float(masked[i]), how)
    return best
