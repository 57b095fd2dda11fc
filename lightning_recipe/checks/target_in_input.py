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
MAX_FEATURES = 1024
#: feature pairs are searched for a product / ratio with the target up to this many columns
MAX_PAIR_FEATURES = 128
#: fewest labels outside the largest class before a feature can be called the label
MIN_MINORITY = 8


class TargetInInputCheck(FirstBatchCheck):
    """Look for the label among the input features ("become one with the data").

    A table that keeps the label column among the features, or a feature computed from the target
    (a ratio such as price per square foot when the price is the target, a bucketed target), gives
    validation metrics far beyond what the data allows, and nothing fails. On the first training
    batches (up to ``num_samples`` samples) the check compares every column of a tabular input
    ``(N, F)`` with every per-sample target: for classes, a feature whose values and the classes
    determine each other on at least ``1 - tolerance`` of the samples; for a continuous target, a
    feature that is an exact affine or monotone function of it, or that makes it exact together
    with one other column through their product or ratio. Only exactness counts: a legitimately
    strong predictor has noise. Images, sequences and single-feature regressions are not judged.

    Reports ``target-in-input`` (warning) naming the feature (or pair of features) and the relation.

    Thresholds: see docs/thresholds.md#target-in-input.

    Args:
        tolerance: share of samples that may contradict "the feature is the label" (in [0, 0.5)).
        num_samples: samples to collect before judging (>= 16).
        num_batches: most training batches to collect them from (>= 1).
        get_input, get_target, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[TargetInInputCheck()])
        trainer.fit(model, datamodule)  # "[target-in-input] Feature 7 is the label: ..."
    """

    codes = ("target-in-input",)
    needs_full_copy = False  # never runs the model on a copy

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
        if x.shape[0] < 16:
            self.figures["note"] = f"only {x.shape[0]} samples without NaN/Inf"
            return
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


def _solve_unexplained(gram: Tensor, rhs: Tensor, total: float | Tensor) -> Tensor:
    """``1 - R^2`` of least-squares fits from their normal equations: ``gram`` (..., P, P),
    ``rhs`` (..., P) = design^T target, ``total`` the target's sum of squares about its mean
    (float64; a tiny ridge keeps collinear pairs solvable, and those are never exact anyway)."""
    p = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp_min(1.0)
    ridge = torch.eye(p, dtype=gram.dtype) * (1e-12 * scale.unsqueeze(-1))
    beta = _spd_solve(gram + ridge, rhs)
    sse = total - (beta * rhs).sum(-1)
    return (sse / total).clamp_min(0)


def _spd_solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve many small symmetric positive definite systems ``a x = b`` at once by Gaussian
    elimination without pivoting, vectorised over the batch (``torch.linalg.solve`` calls LAPACK
    once per 4x4 matrix, 100x slower for thousands of them)."""
    a = a.clone()
    b = b.clone()
    p = a.shape[-1]
    for k in range(p):
        pivot = a[..., k, k].clamp_min(1e-300)
        for i in range(k + 1, p):
            factor = a[..., i, k] / pivot
            a[..., i, :] -= factor.unsqueeze(-1) * a[..., k, :]
            b[..., i] -= factor * b[..., k]
    x = torch.zeros_like(b)
    for k in range(p - 1, -1, -1):
        rest = (a[..., k, k + 1 :] * x[..., k + 1 :]).sum(-1)
        x[..., k] = (b[..., k] - rest) / a[..., k, k].clamp_min(1e-300)
    return x


def _product_pair(xs: Tensor, ys: Tensor, varying: Tensor) -> tuple[int, int, float, str] | None:
    """The pair of columns (f, g) that with their product explains the target best while their
    sum does not, trying ``y ~ 1 + f + g + f*g`` and ``f ~ 1 + y + g + y*g``. Returns
    ``(f, g, 1 - R^2, relation)`` or ``None``. Columns are standardised (mean 0, variance 1),
    so every fit is solved from moments computed with a few matrix products."""
    n, nf = xs.shape
    x2 = xs * xs
    s1 = xs.T @ xs  # sum f g
    s21 = x2.T @ xs  # sum f^2 g
    s22 = x2.T @ x2  # sum f^2 g^2
    sy = xs.T @ ys  # sum f y
    sfgy = xs.T @ (xs * ys.unsqueeze(1))  # sum f g y
    nn_ = torch.full((nf, nf), float(n), dtype=xs.dtype)
    zero = torch.zeros((nf, nf), dtype=xs.dtype)
    # y ~ [1, f, g, f g] for f = row, g = column
    fg_sum = s1
    gram = torch.stack(
        [
            torch.stack([nn_, zero, zero, fg_sum], -1),
            torch.stack([zero, nn_, fg_sum, s21], -1),
            torch.stack([zero, fg_sum, nn_, s21.T], -1),
            torch.stack([fg_sum, s21, s21.T, s22], -1),
        ],
        -2,
    )
    rhs = torch.stack([zero, sy.unsqueeze(1).expand(nf, nf), sy.unsqueeze(0).expand(nf, nf), sfgy], -1)
    u_full = _solve_unexplained(gram, rhs, float(n))
    u_lin = _solve_unexplained(gram[..., :3, :3], rhs[..., :3], float(n))
    # f ~ [1, y, g, y g] for f = row, g = column: the design depends on g only
    y2 = ys * ys
    syg = xs.T @ ys  # sum y g, per g
    sy2g = xs.T @ y2  # sum y^2 g
    syg2 = x2.T @ ys  # sum y g^2
    sy2g2 = x2.T @ y2  # sum y^2 g^2
    ng = torch.full((nf,), float(n), dtype=xs.dtype)
    zg = torch.zeros(nf, dtype=xs.dtype)
    gram_g = torch.stack(
        [
            torch.stack([ng, zg, zg, syg], -1),
            torch.stack([zg, ng, syg, sy2g], -1),
            torch.stack([zg, syg, ng, syg2], -1),
            torch.stack([syg, sy2g, syg2, sy2g2], -1),
        ],
        -2,
    )  # (g, 4, 4)
    rhs2 = torch.stack(
        [zero, sy.unsqueeze(1).expand(nf, nf), s1, sfgy], -1
    )  # (f, g, 4): sum f, sum f y, sum f g, sum f y g
    u_full2 = _solve_unexplained(gram_g.unsqueeze(0).expand(nf, nf, 4, 4), rhs2, float(n))
    u_lin2 = _solve_unexplained(gram_g[:, :3, :3].unsqueeze(0).expand(nf, nf, 3, 3), rhs2[..., :3], float(n))
    usable = varying.unsqueeze(1) & varying.unsqueeze(0) & ~torch.eye(nf, dtype=torch.bool)
    best: tuple[int, int, float, str] | None = None
    for u, ul, how in ((u_full, u_lin, "target ~ f * g"), (u_full2, u_lin2, "f ~ target * g")):
        ok = usable & (ul > 1e-3)
        if not bool(ok.any()):
            continue
        masked = torch.where(ok, u, torch.ones_like(u))
        i = int(masked.argmin())
        f, g = divmod(i, nf)
        if best is None or float(masked[f, g]) < best[2]:
            best = (f, g, float(masked[f, g]), how)
    return best
