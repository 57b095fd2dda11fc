"""TrainValOverlapCheck: are validation examples also in the training data?"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_recipe import _context
from lightning_recipe._probe import (
    ProbeSkip,
    capture_step,
    copy_module,
    has_own_validation_step,
    iter_train_batches,
    preserved_rng,
    seed_rngs,
    takes_dataloader_iter,
)
from lightning_recipe._validate import check_int, check_number
from lightning_recipe.batch import BatchLayoutError, Getter, detach_clone
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.findings import Severity

#: primes below 2**31 that fold a sample's four exact hash sums into a 62-bit fingerprint
_P1, _P2 = 2147483647, 2147483629
_PRIMES = (_P1, _P2, _P1, _P2)
#: values of a sample hashed at most (a fixed random subset of positions beyond that)
MAX_POSITIONS = 4096
#: a tabular column with at most this many distinct values in the first batch counts as discrete
_DISCRETE_VALUES = 16


#: training samples read from a fresh iterator when ``training_step`` takes ``dataloader_iter``
DATALOADER_ITER_SAMPLES = 65536


class TrainValOverlapCheck(RecipeCallback):
    """Count the validation examples that also occur in the training data.

    Karpathy's first step is to "become one with the data" and look for duplicates; the most
    expensive duplicates are those across the split: a minority class upsampled before the
    train/validation split, a dataset with repeated rows split at random, a validation loader that
    reads the training set. The validation metrics then measure memorisation. The check rides along
    the first training epoch and the first validation run, computing a 62-bit fingerprint of each
    sample's input on the device (no host sync, no extra pass over your data), and at the end of
    the first epoch counts the validation samples whose fingerprint is also a training one (under
    DDP, gathered over the ranks). Only exact copies are found: augmented samples are not.

    Reports ``train-val-overlap`` (warning) when at least ``max_fraction`` of the validation samples
    (and at least ``min_count``) also occur in training; info for fewer. Discrete inputs (token ids,
    categorical tables) repeat by nature, so for them the share must also clearly exceed the rate at
    which the training data repeats itself.

    A warning is first confirmed on a copy: when on the same shared batch the validation loss
    compares against targets the training loss never uses, the step splits each sample itself
    (a forecaster validating on each series' held-out tail): info.

    Thresholds: see docs/thresholds.md#train-val-overlap.

    Args:
        max_fraction: share of the validation samples found in training from which it
            warns (in (0, 1]).
        min_count: fewest shared samples for a warning (>= 1).
        max_samples: training samples fingerprinted at most (>= 1; 8 bytes each).
        get_input: ``callable(batch) -> Tensor`` for batch layouts the guess cannot read.
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[TrainValOverlapCheck()])
        trainer.fit(model, train_loader, val_loader)  # "[train-val-overlap] 212 of 425 ..."
    """

    codes = ("train-val-overlap",)
    what = "compare training and validation samples"
    # runs the model on a copy only to confirm an overlap (a copy that fails keeps the warning)
    needs_full_copy = False

    def __init__(
        self,
        max_fraction: float = 0.01,
        min_count: int = 3,
        max_samples: int = 1 << 22,
        *,
        get_input: Getter | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        self.max_fraction = check_number("max_fraction", max_fraction, 0.0, 1.0, low_open=True)
        self.min_count = check_int("min_count", min_count)
        self.max_samples = check_int("max_samples", max_samples)
        self.read_batches_with(get_input)
        self.done = False
        self._started = False
        self._train: list[Tensor] = []
        self._train_seen = 0
        self._train_complete = False
        self._val: list[Tensor] = []
        self._val_complete = False
        self._val_full = False
        self._val_runs = 0
        self._log_coincidence: float | None = None
        self._continuous = True
        self._coeffs: dict[tuple[int, str], tuple[Tensor | None, Tensor, Tensor]] = {}
        self._val_batch: Any = None

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.done or self._train_complete:
            return
        if not self._started:
            self._started = True
            if trainer.global_step > 0:  # resumed: the first epoch is gone
                self.done = True
                self._release()
                return
            if batch is None and takes_dataloader_iter(pl_module):
                # ``training_step(self, dataloader_iter)``: Lightning hands callbacks no batch, so
                # the training data is read once from a fresh iterator (RNG restored)
                self.run_safely(trainer, "on_train_batch_start", self._read_training_data, trainer)
                return
            self.run_safely(trainer, "on_train_batch_start", self._first_batch, trainer, batch)
        if not self.done and self._train_seen < self.max_samples:
            self.run_safely(trainer, "on_train_batch_start", self._add, trainer, self._train, batch)

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.done or self._val_complete or dataloader_idx != 0:
            return
        if not self._val_full and not getattr(trainer, "sanity_checking", False):
            self._val_full = True  # the full run sees the sanity check's batches again
            self._val = []
            self._val_batch = detach_clone(batch)  # kept to confirm an overlap (one batch)
        self.run_safely(trainer, "on_validation_batch_start", self._add, trainer, self._val, batch)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.done or getattr(trainer, "sanity_checking", False):
            return
        self._val_runs += 1
        self._val_complete = True
        if self._train_complete:
            self._judge(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.done or not self._started:
            return
        self._train_complete = True
        if self._val_runs > 0:
            self._judge(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.done and self._started:
            self._judge(trainer)

    def teardown_diagnostics(self) -> None:
        self._release()

    def _release(self) -> None:
        self._train, self._val, self._coeffs = [], [], {}
        self._val_batch = None

    # ------------------------------------------------------------------ fingerprints
    def _first_batch(self, trainer: Any, batch: Any) -> None:
        try:
            x = self.adapter.input(batch).detach()
        except BatchLayoutError as why:
            self._unreadable(trainer, str(why))
            return
        self._log_coincidence = _log_coincidence(x)
        # continuous values (float images, a table with a continuous column) never repeat by chance
        self._continuous = x.is_floating_point() and self._log_coincidence is None

    def _read_training_data(self, trainer: Any) -> None:
        limit = min(self.max_samples, DATALOADER_ITER_SAMPLES)
        try:
            with preserved_rng():
                for i, batch in enumerate(iter_train_batches(trainer)):
                    if i == 0:
                        self._first_batch(trainer, batch)
                    if self.done or self._train_seen >= limit:
                        break
                    self._add(trainer, self._train, batch)
        except ProbeSkip as why:
            self._unreadable(trainer, str(why))
            return
        self.figures["read_from_fresh_iterator"] = self._train_seen

    def _add(self, trainer: Any, store: list[Tensor], batch: Any) -> None:
        try:
            x = self.adapter.input(batch)
        except BatchLayoutError as why:
            self._unreadable(trainer, str(why))
            return
        if x.dim() == 0 or x.shape[0] == 0:
            return
        fp = self.fingerprint(x)
        store.append(fp)
        if store is self._train:
            self._train_seen += int(fp.shape[0])

    def _unreadable(self, trainer: Any, reason: str) -> None:
        """The batch layout cannot be read: skip (every rank alike, the layout is the same)."""
        self.done = True
        self._release()
        self.figures["skipped"] = reason
        self.report(
            trainer,
            "check-skipped",
            Severity.INFO,
            f"{type(self).__name__} did not compare training and validation samples: {reason.rstrip('.')}.",
            {"reason": reason},
        )

    def fingerprint(self, x: Tensor) -> Tensor:
        """One int64 fingerprint per sample (first dimension) of ``x``, computed on its device
        from the exact bits of the values; equal samples get equal fingerprints.

        Each value's 32 bits are read as two 16-bit integers and multiplied by a fixed matrix of
        random 20-bit integers (4 columns) in float64: every product and partial sum is an
        integer below 2**53, so the matrix product is exact whatever order BLAS sums in (and
        the same for a sample in a batch of 16 or 512). The 4 sums are folded into 62 bits. MPS
        has no float64: there the same idea runs in int64 arithmetic modulo two primes."""
        n = x.shape[0]
        flat = x.detach().reshape(n, -1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(n, -1)
        idx, weights, primes = self._coefficients(flat.shape[1], flat.device)
        if idx is not None:
            flat = flat.index_select(1, idx)
        if flat.is_floating_point():  # the two 16-bit halves of each float32 (+ 0.0: -0.0 == 0.0)
            halves = (flat.float() + 0.0).contiguous().view(torch.int16)
        else:  # token ids, bytes, -100 padding: the two 16-bit halves of their low 32 bits
            v = flat.long()
            halves = torch.cat([v & 0xFFFF, (v >> 16) & 0xFFFF], 1)
        if flat.device.type == "mps":
            wide = halves.long()
            h = torch.stack(
                [torch.remainder(wide * w.long(), p).sum(1) % p for w, p in zip(weights.T, _PRIMES)], 1
            )
        else:  # |half| < 2**16, weights < 2**20, at most 8192 terms: exact below 2**53
            h = (halves.double() @ weights).long()
        h = torch.remainder(h, primes)
        return (h[:, 0] * _P2 + h[:, 1]) ^ (h[:, 2] * _P2 + h[:, 3])

    def _coefficients(self, d: int, device: torch.device) -> tuple[Tensor | None, Tensor, Tensor]:
        """Positions, weights and primes for samples of ``d`` values, made once per device (no
        host-to-device copy in the steps)."""
        key = (d, str(device))
        if key not in self._coeffs:
            g = torch.Generator().manual_seed(0x5EED + d)
            idx = None
            if d > MAX_POSITIONS:
                idx = torch.randperm(d, generator=g)[:MAX_POSITIONS].sort().values.to(device)
            m = min(d, MAX_POSITIONS)
            weights = torch.randint(1, 1 << 20, (2 * m, 4), generator=g, dtype=torch.long)
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            primes = torch.tensor(_PRIMES, dtype=torch.long, device=device)
            self._coeffs[key] = (idx, weights.to(device=device, dtype=dtype), primes)
        return self._coeffs[key]

    # ------------------------------------------------------------------ judging
    def _judge(self, trainer: Any) -> None:
        """Count the overlap; every rank calls the same collectives, whatever it collected."""
        self.done = True
        device = getattr(getattr(trainer, "strategy", None), "root_device", torch.device("cpu"))
        train = _cat(self._train, device)
        val = _cat(self._val, device)
        batch = self._val_batch
        self._release()
        world = _context.world_size(trainer)
        if world > 1:
            val = _gather(trainer, val)
        train_unique = torch.unique(train)
        val_unique, val_counts = torch.unique(val, return_counts=True)
        hits = torch.isin(val_unique, train_unique).float()
        # the rate at which training samples repeat by nature: second half of the epoch vs first
        half = train.numel() // 2
        repeats = torch.isin(train[half:], torch.unique(train[:half])).sum().float()
        stats = torch.stack(
            [
                torch.tensor(float(train.numel()), device=hits.device),
                torch.tensor(float(train_unique.numel()), device=hits.device),
                repeats.to(hits.device),
                torch.tensor(float(train.numel() - half), device=hits.device),
            ]
        )
        if world > 1:
            hits = trainer.strategy.reduce(hits, reduce_op="sum")
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
        self.run_safely(trainer, "judge", self._verdict, trainer, hits > 0, val_counts, stats, batch)

    def _verdict(
        self, trainer: Any, hits: Tensor, val_counts: Tensor, stats: Tensor, batch: Any = None
    ) -> None:
        val_distinct = int(hits.numel())
        val_samples = int(val_counts.sum())
        shared_distinct = int(hits.sum())
        shared = int(val_counts[hits].sum())
        train_samples, train_distinct, repeats, second_half = (int(v) for v in stats.tolist())
        repeat_rate = repeats / second_half if second_half else 0.0
        if val_distinct == 0 or train_samples == 0:
            self.figures["note"] = "no validation or no training samples were fingerprinted"
            return
        fraction = shared / val_samples
        expected = 0.0
        if self._log_coincidence is not None:  # validation samples equal to a training one by chance
            p = math.exp(self._log_coincidence)
            expected = val_samples * min(1.0, train_distinct * p)
        self.figures.update(
            {
                "shared": shared,
                "shared_distinct": shared_distinct,
                "val_samples": val_samples,
                "val_distinct": val_distinct,
                "train_samples": train_samples,
                "train_distinct": train_distinct,
                "fraction": fraction,
                "expected_by_chance": expected,
                "train_repeat_rate": repeat_rate,
            }
        )
        if shared == 0:
            return
        evidence = {**self.figures, "max_fraction": self.max_fraction, "min_count": self.min_count}
        where = (
            f"{shared} of the {val_samples} validation samples ({fraction:.1%}; {shared_distinct} "
            f"distinct) also occur among the {train_samples} training samples of the first epoch"
        )
        # token ids and categorical rows repeat by nature (short common phrases): there the
        # overlap must exceed twice the rate at which the training data repeats itself
        natural = 0.0 if self._continuous else 2 * repeat_rate
        loud = (
            fraction >= self.max_fraction + natural
            and shared >= self.min_count
            and shared > 10 * expected + 2
        )
        inside = self._split_inside(trainer, batch) if loud else None
        if inside is not None:
            self.figures["split_inside_the_step"] = inside
            self.report(
                trainer,
                "train-val-overlap",
                Severity.INFO,
                f"{where}, but {inside}: the split is made inside the step, not between the loaders.",
                {**evidence, "split_inside_the_step": inside},
            )
        elif loud:
            self.report(
                trainer,
                "train-val-overlap",
                Severity.WARNING,
                f"{where}: the validation metrics partly measure memorisation. Deduplicate before "
                "splitting, oversample or augment inside the training split only, and make sure the "
                "validation loader does not read training data.",
                evidence,
            )
        else:
            chance = (
                f" (about {expected:.3g} expected by chance for inputs this discrete)" if expected else ""
            )
            if natural:
                chance += (
                    f" (the training data repeats itself at a rate of {repeat_rate:.1%}: "
                    "token ids and categorical rows recur by nature)"
                )
            self.report(
                trainer,
                "train-val-overlap",
                Severity.INFO,
                f"{where}{chance}; below the warning limit of {self.max_fraction:.0%} and "
                f"{self.min_count} samples.",
                evidence,
            )

    def _split_inside(self, trainer: Any, batch: Any) -> str | None:
        """Why a shared sample is no leak, or ``None``: the user's ``training_step`` and
        ``validation_step`` run on a copy on the same (shared) validation batch, and the targets
        that reach the validation loss are mostly values the training loss never compares
        against -- the step splits each sample itself (a forecasting model trains on the early
        part of each series and validates on its held-out tail). A loader that reads the
        training data validates on the very targets it trains on, so the warning stands."""
        module = getattr(trainer, "lightning_module", None)
        if batch is None or module is None or not has_own_validation_step(module):
            return None
        try:
            clone = copy_module(module, trainer)
            clone.eval()  # both steps see the same forward pass (no dropout)
            with preserved_rng(), torch.no_grad():
                seed_rngs(0)
                train = capture_step(clone, "training_step", batch).main_call
                seed_rngs(0)
                val = capture_step(clone, "validation_step", batch).main_call
        except Exception:
            return None
        a = getattr(train, "target", None)
        b = getattr(val, "target", None)
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or b.numel() == 0:
            return None
        if not b.is_floating_point():
            # class labels repeat by nature: compare which samples' predictions each loss reads
            # (one graph whose nodes are split by train/val masks reads disjoint rows)
            return self._rows_apart(getattr(train, "input", None), getattr(val, "input", None))
        seen = torch.isin(b.detach().reshape(-1), a.detach().reshape(-1).to(b.device)).float().mean()
        share = float(seen)
        self.figures["validation_targets_seen_in_training"] = share
        if share >= 0.5:
            return None
        return (
            f"on the same batch only {share:.0%} of the target values of the validation loss are "
            "among those of the training loss"
        )

    def _rows_apart(self, a: Any, b: Any) -> str | None:
        """Why the validation loss reads other samples than the training loss, or ``None``: the
        rows of the prediction that reach each loss (on the same batch, the same forward pass),
        fingerprinted; continuous predictions of two different samples never coincide."""
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or not b.is_floating_point():
            return None
        if a.dim() == 0 or b.dim() == 0 or a.shape[1:] != b.shape[1:] or b.shape[0] == 0:
            return None
        fa = self.fingerprint(a.detach().reshape(a.shape[0], -1))
        fb = self.fingerprint(b.detach().reshape(b.shape[0], -1).to(a.device))
        share = float(torch.isin(fb, fa).float().mean())
        self.figures["validation_predictions_seen_in_training"] = share
        if share >= 0.5:
            return None
        return (
            f"on the same batch only {share:.0%} of the {b.shape[0]} predictions the validation loss "
            f"reads are among the {a.shape[0]} the training loss reads (the step selects its samples "
            "itself, e.g. train/val masks over the nodes of one graph)"
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))


# ---------------------------------------------------------------------------- helpers
def _cat(parts: list[Tensor], device: torch.device) -> Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat([p.to(device) for p in parts])


def _gather(trainer: Any, values: Tensor) -> Tensor:
    """Every rank's ``values`` (1-D, non-negative int64, lengths may differ), on every rank."""
    size = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    sizes = trainer.strategy.all_gather(size).reshape(-1)
    longest = int(sizes.max())
    padded = torch.full((longest,), -1, device=values.device, dtype=torch.long)
    padded[: values.numel()] = values
    gathered = trainer.strategy.all_gather(padded).reshape(-1)
    return gathered[gathered >= 0]


def _log_coincidence(x: Tensor) -> float | None:
    """log of the chance that two random samples are equal, for inputs whose every column takes
    few values (columns taken as independent); ``None`` for continuous or high-cardinality data,
    where an equal pair is no coincidence."""
    if x.dim() != 2 or x.shape[0] < 32 or x.shape[1] > 256:
        return None
    total = 0.0
    for j in range(x.shape[1]):
        _, counts = torch.unique(x[:, j], return_counts=True)
        if counts.numel() > _DISCRETE_VALUES:
            return None
        p = counts.double() / x.shape[0]
        total += math.log(float((p * p).sum()))
    return total
