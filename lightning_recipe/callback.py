"""The base class of every recipe callback: findings, emission, guarding, resume state."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from lightning.pytorch.callbacks import Callback

from lightning_recipe import _context, _sharded, tensorboard
from lightning_recipe import report as _report
from lightning_recipe._probe.base import ProbeSkip
from lightning_recipe._validate import check_callable
from lightning_recipe.batch import BatchAdapter, Getter
from lightning_recipe.findings import Finding, RecipeError, RecipeWarning, Severity, _jsonable, check_code

F = TypeVar("F", bound=Callable[..., Any])

ON_ERROR_CHOICES = ("warn", "raise")


def validate_on_error(on_error: str) -> str:
    """Check the ``on_error`` argument and return it."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"`on_error` must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


class RecipeCallback(Callback):
    """Base of every ``lightning_recipe`` callback.

    It keeps the callback's findings (:attr:`findings`), issues each warning/error finding once
    per code as a :class:`~lightning_recipe.RecipeWarning` on rank zero, raises
    :class:`~lightning_recipe.RecipeError` for error findings when ``on_error="raise"``, turns an
    internal failure of a diagnostic into an ``internal-error`` info finding (the user's run goes
    on), and saves its findings in checkpoints so a resumed run neither repeats nor loses them.

    Subclasses implement Lightning hooks, call :meth:`report` with measured numbers, and put
    their key figures in :attr:`figures` (they go to ``recipe_report.json``).

    Example::

        class MyCheck(RecipeCallback):
            def on_train_start(self, trainer, pl_module):
                self.report(trainer, "check-skipped", "info", "nothing to check", {"why": "demo"})
    """

    #: the finding codes this callback can report (besides ``check-skipped`` / ``internal-error``),
    #: so sibling callbacks can tell who covers a verdict (:func:`_context.reports_code`)
    codes: tuple[str, ...] = ()
    #: a short verb phrase for skip messages: "<Class> did not <what>: <reason>."
    what = "run"

    #: whether the callback runs the model on copies (``_probe.copy_module``): under a sharding
    #: strategy the full weights are then gathered at fit start (see ``lightning_recipe._sharded``)
    needs_full_copy: bool = True

    def __init__(self, *, on_error: str = "warn") -> None:
        super().__init__()
        self.on_error = validate_on_error(on_error)
        self._findings: list[Finding] = []
        self._emitted: set[str] = set()
        self._broken = False
        #: key figures for the report, JSON-ready: {"loss": 2.31, ...}
        self.figures: dict[str, Any] = {}
        #: print the report at fit end (the JSON and TensorBoard report are always written)
        self.print_report = True

    # ------------------------------------------------------------------ findings
    @property
    def findings(self) -> list[Finding]:
        """The findings this callback has made so far, in the order it made them."""
        return list(self._recipe_findings())

    def _recipe_findings(self) -> list[Finding]:
        # created lazily too, so subclasses of other callbacks (EarlyStopping) that run
        # their own __init__ chain still work
        if not hasattr(self, "_findings"):
            self._findings = []
            self._emitted = set()
            self._broken = False
            self.figures = {}
            self.on_error = "warn"
            self.print_report = True
        return self._findings

    def report(
        self,
        trainer: Any | None,
        code: str,
        severity: Severity | str,
        message: str,
        evidence: dict[str, Any] | None = None,
        *,
        step: int | None = None,
    ) -> Finding:
        """Record a finding; warn (rank zero, once per code) and raise if asked to.

        Args:
            trainer: the trainer (``None`` in ``preflight``).
            code: a code from :data:`~lightning_recipe.findings.CATALOG`.
            severity: ``"info"``, ``"warning"`` or ``"error"``.
            message: one sentence with the measured numbers and what to try.
            evidence: the numbers behind the message.
            step: defaults to ``trainer.global_step``.
        """
        found = Finding(
            code=check_code(code),
            severity=Severity(severity),
            message=message,
            source=type(self).__name__,
            step=_context.global_step(trainer) if step is None else int(step),
            evidence=dict(evidence or {}),
        )
        self._recipe_findings().append(found)
        if found.severity is not Severity.INFO and code not in self._emitted:
            self._emitted.add(code)
            if _context.is_global_zero(trainer):
                warnings.warn(f"[{code}] {message}", RecipeWarning, stacklevel=2)
        if trainer is not None:
            _report.findings_changed(trainer)
        if found.severity is Severity.ERROR and self.on_error == "raise":
            if getattr(self, "_defer_errors", False):
                if getattr(self, "_pending_error", None) is None:
                    self._pending_error = found
            else:
                raise RecipeError(found)
        return found

    @contextmanager
    def rank_consistent_errors(self, trainer: Any | None) -> Iterator[None]:
        """Hold back :class:`RecipeError` during the block; afterwards raise it on every rank if
        any rank had an error finding.

        With ``on_error="raise"`` under DDP this makes one ``reduce_boolean_decision`` after the
        block, so the fit stops on all ranks together instead of one rank raising while the
        others wait in the next all-reduce. Every rank must enter the block at the same point
        (the first training batch, say); nothing is communicated with ``on_error="warn"``.
        """
        self._defer_errors = True
        self._pending_error = None
        try:
            yield
        finally:
            self._defer_errors = False
        pending, self._pending_error = self._pending_error, None
        if self.on_error != "raise":
            return
        if trainer is not None and _context.world_size(trainer) > 1:
            hit = bool(trainer.strategy.reduce_boolean_decision(pending is not None, all=False))
        else:
            hit = pending is not None
        if hit:
            if pending is not None:
                raise RecipeError(pending)
            raise RecipeError(
                None,
                f"{type(self).__name__} stopped the fit: another rank made an error finding "
                "(on_error='raise'); that rank raised RecipeError with the finding in its message.",
            )

    def skip(
        self, trainer: Any | None, reason: str, *, once: bool = False, **evidence: Any
    ) -> Finding | None:
        """Report that this diagnostic could not run, and why (``check-skipped``, info): the one
        place that words a skip. ``once=True`` says it only the first time (a resumed run keeps
        the finding from before); ``evidence`` adds numbers to ``{"reason": reason}``."""
        self.figures["skipped"] = reason
        if once and self.has_reported("check-skipped"):
            return None
        return self.report(
            trainer,
            "check-skipped",
            Severity.INFO,
            f"{type(self).__name__} did not {self.what}: {reason.rstrip('.')}.",
            {"reason": reason, **evidence},
        )

    def read_batches_with(
        self, get_input: Getter | None = None, get_target: Getter | None = None, step_fn: Any = None
    ) -> None:
        """Set up how this callback reads batches and runs steps: :attr:`adapter` (the batch
        layout guess, or ``get_input`` / ``get_target``) and :attr:`step_fn` (``None``: the
        user's own ``training_step`` / ``validation_step`` through the probe layer)."""
        self.adapter = BatchAdapter(get_input, get_target)
        self.step_fn = check_callable("step_fn", step_fn, "(model, batch) -> loss")

    def withdraw(self, trainer: Any | None, finding: Finding, reason: str) -> Finding:
        """Downgrade a warning/error ``finding`` that the run itself refuted (a trend verdict
        re-judged at the end of fit) to info, saying why; returns the replacement. The warning
        already issued cannot be unsaid, but the report, ``findings(trainer)`` and TensorBoard
        show the verdict as withdrawn."""
        found = self._recipe_findings()
        replacement = Finding(
            code=finding.code,
            severity=Severity.INFO,
            message=f"{finding.message} Withdrawn at the end of fit: {reason.rstrip('.')}.",
            source=finding.source,
            step=finding.step,
            evidence={**finding.evidence, "withdrawn": reason, "was": finding.severity.value},
        )
        for i, f in enumerate(found):
            if f is finding:
                found[i] = replacement
        if trainer is not None:
            _report.findings_changed(trainer)
        return replacement

    def has_reported(self, code: str) -> bool:
        """True if this callback already made a finding with ``code``."""
        return any(f.code == code for f in self._recipe_findings())

    # ------------------------------------------------------------------ guarding
    def run_safely(self, trainer: Any | None, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)``; on an internal failure report ``internal-error``, turn this
        callback off and return ``None``. A :class:`ProbeSkip` that reaches here (the user's own
        step raised on the probe's copy) is a ``check-skipped`` with the reason instead, and the
        callback stops too. :class:`RecipeError` passes through."""
        if getattr(self, "_broken", False):
            return None
        try:
            if torch.is_anomaly_enabled():
                # Trainer(detect_anomaly=True) is for the run's own backward; a probe's backward on
                # a copy measures NaN gradients instead of raising on them (and runs at full speed)
                with torch.autograd.set_detect_anomaly(False):
                    return fn(*args)
            return fn(*args)
        except RecipeError:
            raise
        except ProbeSkip as why:
            # the user's step raised on the probe's copy (UserStepError), or a probe could not run
            # on this model: not a failure of the diagnostic, a precise skip; the callback stops
            self._broken = True
            try:
                self.teardown_diagnostics()
            except Exception:
                pass
            self.skip(trainer, f"{why} (in {what})", once=True)
            return None
        except Exception as exc:
            self._broken = True
            try:
                self.teardown_diagnostics()
            except Exception:
                pass
            self.report(
                trainer,
                "internal-error",
                Severity.INFO,
                f"{type(self).__name__} failed internally in {what} and turned itself off; "
                f"training continues unaffected ({type(exc).__name__}: {exc}).",
                {"where": what, "error": f"{type(exc).__name__}: {exc}"},
            )
            return None

    def teardown_diagnostics(self) -> None:
        """Detach hooks and free buffers; called when the callback turns itself off.
        Subclasses with hooks or snapshots override it."""

    @property
    def active(self) -> bool:
        """False once the callback turned itself off after an internal error."""
        return not getattr(self, "_broken", False)

    # ------------------------------------------------------------------ lifecycle
    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        """Charts this callback adds to the custom-scalars layout:
        ``{"Recipe": {"title": ("Multiline", [tag regex, ...])}}``. Default: none."""
        return {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            callbacks = _context.recipe_callbacks_of(trainer)
            if callbacks and callbacks[0] is self:
                _context.reset_trainer_state(trainer)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        tensorboard.write_layout(trainer)
        _report.write_snapshot_once(trainer)
        # sharded model: the full weights for the probes' copies, gathered once at fit start (a
        # collective every rank reaches here; the next recipe callbacks find them gathered)
        _sharded.gather_point(trainer, pl_module, need=_any_copier(trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        _sharded.release(pl_module)
        _report.write_report_if_last(trainer, self)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        try:  # never replace the exception that ends the run with one of ours
            self.teardown_diagnostics()
        except Exception:
            pass
        _report.write_report_if_last(trainer, self, status="failed")

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self._recipe_findings()],
            "emitted": sorted(self._emitted),
            "figures": _context_safe(self.figures),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._findings = [Finding.from_dict(d) for d in state_dict.get("findings", [])]
        self._emitted = set(state_dict.get("emitted", []))
        self.figures = dict(state_dict.get("figures", {}))


def _any_copier(trainer: Any) -> bool:
    """True when a recipe callback of this trainer runs the model on copies (the same answer on
    every rank: it depends on the callback list only)."""
    return any(
        isinstance(cb, RecipeCallback) and cb.needs_full_copy for cb in getattr(trainer, "callbacks", ())
    )


def _context_safe(figures: dict[str, Any]) -> dict[str, Any]:
    return _jsonable(figures)


def guarded(hook: F) -> F:
    """Decorator for hook methods: skip when the callback is off, and turn an internal failure
    into an ``internal-error`` info finding (see :meth:`RecipeCallback.run_safely`).

    Do not put a hook that calls a collective (all-reduce, broadcast) behind it: a failure on
    one rank would skip the collective there and hang the others. Use ``run_safely`` around
    the local computation and call the collective unconditionally instead.
    """

    @functools.wraps(hook)
    def wrapper(self: RecipeCallback, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        return self.run_safely(trainer, hook.__name__, lambda: hook(self, trainer, *args, **kwargs))

    return wrapper  # type: ignore[return-value]
