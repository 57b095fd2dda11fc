"""Seeing what reaches the loss when the loss is not a ``torch.nn.functional`` loss.

:class:`~lightning_recipe._probe.LossCapture` records ``torch.nn.functional`` losses (and the
``nn.*Loss`` modules that call them). Third-party models compute their loss in other ways:

* a custom ``nn.Module`` loss, or a torchmetrics ``Metric`` used as a loss (forecasting
  libraries call ``self.loss(prediction, (target, weight))``): :class:`ModuleLossRecorder`
  records every call of a module without trainable parameters that gets a floating-point tensor
  first and returns a one-element floating-point tensor;
* the negative log-likelihood of a predicted ``torch.distributions`` object:
  :class:`ModuleLossRecorder` also records ``Distribution.log_prob`` calls (the outermost one).

Both are kept as :class:`ModuleLossCall`, which reads like ``_probe.LossCall`` (``name``,
``input`` = the prediction, ``target``, ``output``, ``recompute``), so the checks use them the
same way. :func:`know_nothing_candidates` gives the loss-agnostic know-nothing references: the
user's own loss with the prediction replaced by a constant (the target mean, uniform class
scores, or the batch-mean prediction: the output layer reduced to its bias).

It depends only on ``batch`` in the package (``_probe`` imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe.batch import BatchAdapter

#: the reference kinds (the first two are also ``_probe.CHANCE`` / ``_probe.MEAN_PREDICTOR``)
CHANCE, MEAN_PREDICTOR = "chance loss", "mean-predictor loss"
CONSTANT = "constant-prediction loss"

#: at most this many classes are tried one by one for the label-free loss
MAX_LABELS = 64


def _first_tensor(value: Any, ok: Callable[[Tensor], bool]) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if ok(value) else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            hit = _first_tensor(v, ok)
            if hit is not None:
                return hit
    return None


def _replace_tensor(value: Any, old: Tensor, new: Tensor) -> Any:
    """``value`` with the tensor ``old`` replaced by ``new`` (lists, tuples and dicts rebuilt)."""
    if value is old:
        return new
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_replace_tensor(v, old, new) for v in value)
    if isinstance(value, list):
        return [_replace_tensor(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace_tensor(v, old, new) for k, v in value.items()}
    return value


def _distribution_mean(dist: Any) -> Tensor | None:
    try:
        mean = dist.mean
    except Exception:
        mean = None
    if isinstance(mean, Tensor) and mean.is_floating_point() and bool(torch.isfinite(mean).all()):
        return mean
    for name in getattr(dist, "arg_constraints", {}):
        value = dist.__dict__.get(name)
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
    return None


def _is_prediction(t: Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 1


def _same_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False


@dataclass
class ModuleLossCall:
    """A loss computed by a module (or a distribution's ``log_prob``), read like ``LossCall``.

    ``input`` is the prediction (for a distribution its mean), ``target`` the first tensor
    passed after it (``(target, weight)`` tuples are looked into), ``output`` the loss value.
    For a distribution the loss is ``sign * reduce(log_prob(target))`` as matched with the
    step's loss (``-mean`` for the usual negative log-likelihood)."""

    name: str
    input: Tensor
    target: Any
    kwargs: dict[str, Any]
    output: Tensor
    args: tuple = ()
    squashed_by: str | None = None
    fn: Any = None
    #: "module" or "distribution"
    kind: str = "module"
    distribution: Any = None
    reduce: str = "mean"
    sign: float = -1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def function(self) -> Any:
        return self.fn

    def recompute(self, new_input: Any, new_target: Tensor | None = None) -> Tensor:
        """The same loss (same module, same other arguments) on another prediction (a tensor,
        or for a distribution loss a distribution or a tensor replacing its mean); with
        ``new_target`` the target tensor replaced too."""
        if self.kind == "step":
            if new_target is not None:
                raise ValueError("the target of a whole step cannot be replaced")
            return self.fn(new_input)
        if self.kind == "distribution":
            dist = new_input if not isinstance(new_input, Tensor) else self._with_mean(new_input)
            value = self.args[1] if new_target is None else new_target
            lp = dist.log_prob(value)
            out = lp.mean() if self.reduce == "mean" else lp.sum()
            return self.sign * out
        args = list(self.args)
        kwargs = dict(self.kwargs)
        at = self.extra.get("pred_at", 0)
        if isinstance(at, str):
            kwargs[at] = new_input
        else:
            args[at] = new_input
        if new_target is not None and isinstance(self.target, Tensor):
            args = [_replace_tensor(a, self.target, new_target) for a in args]
            kwargs = {k: _replace_tensor(v, self.target, new_target) for k, v in kwargs.items()}
        return self.fn(*args, **kwargs)

    def _with_mean(self, mean: Tensor) -> Any:
        """The same distribution with its mean moved to ``mean``: the parameter that is the mean
        replaced, or else a parameter of the mean's shape scaled, shifted or log-shifted so that
        the rebuilt distribution's mean is ``mean`` (checked: a zero-inflated count model's mean
        is ``mu * (1 - pi)``, a log-normal's ``exp(loc + scale**2 / 2)``)."""
        dist = self.distribution
        params = _distribution_params(dist)
        for name, value in params.items():
            if value is self.input:
                params[name] = mean
                return type(dist)(**params)
        old = self.input.detach()
        moves = (
            lambda p: p * (mean / old),
            lambda p: p + (mean - old),
            lambda p: p + (mean.clamp_min(1e-12).log() - old.clamp_min(1e-12).log()),
        )
        with torch.no_grad():
            for name, value in params.items():
                if not isinstance(value, Tensor) or value.shape != old.shape:
                    continue
                for move in moves:
                    try:
                        rebuilt = type(dist)(**{**params, name: move(value)})
                        got = _distribution_mean(rebuilt)
                    except Exception:
                        continue
                    if got is not None and bool(torch.allclose(got, mean, rtol=1e-3, atol=1e-6)):
                        return rebuilt
        raise ValueError(f"the mean of {type(dist).__name__} is not one of its parameters")


#: the recorders entered now (the innermost last); ``log_prob`` wrappers record into the last
_ACTIVE: list[ModuleLossRecorder] = []
#: marks a ``log_prob`` this module wrapped
_WRAPPED = "_lightning_recipe_log_prob"


def _wrap_log_prob(original: Any) -> Any:
    def log_prob(dist: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        if not _ACTIVE:
            return original(dist, value, *args, **kwargs)
        recorders = list(_ACTIVE)  # every active recorder sees the call (captures may nest)
        for r in recorders:
            r._lp_depth += 1
        try:
            out = original(dist, value, *args, **kwargs)
        finally:
            for r in recorders:
                r._lp_depth -= 1
        if isinstance(out, Tensor) and isinstance(value, Tensor):
            for r in recorders:
                if r._lp_depth == 0:
                    r.log_probs.append((dist, value, out))
        return out

    setattr(log_prob, _WRAPPED, original)
    log_prob.__doc__ = original.__doc__
    log_prob.__name__ = getattr(original, "__name__", "log_prob")
    log_prob.__qualname__ = getattr(original, "__qualname__", "log_prob")
    return log_prob


def _wrap_distributions() -> None:
    """Wrap ``log_prob`` of every loaded ``torch.distributions`` class once (classes defined
    later are wrapped at the next probe). Outside a probe the wrapper only calls the original:
    wrapping and unwrapping at every probe step would cost more (each class attribute change
    invalidates Python's method caches)."""
    from torch.distributions import Distribution

    seen: set[type] = set()
    todo: list[type] = [Distribution]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        original = cls.__dict__.get("log_prob")
        if original is not None and callable(original) and not hasattr(original, _WRAPPED):
            type.__setattr__(cls, "log_prob", _wrap_log_prob(original))


#: marks a ``__call__`` this module wrapped
_CALL_WRAPPED = "_lightning_recipe_call"


def _own_call(cls: type) -> type | None:
    """The class in ``cls``'s MRO (before ``nn.Module``) that defines its own ``__call__``."""
    for klass in cls.__mro__:
        if klass is nn.Module:
            return None
        if "__call__" in klass.__dict__:
            return klass
    return None


def _wrap_call(cls: type) -> None:
    """Wrap the overridden ``__call__`` of a loss module class once (some libraries' losses
    override ``__call__``, so forward hooks never see them); outside a recorder, or for a module
    the active recorder does not watch, the wrapper only calls the original."""
    owner = _own_call(cls)
    if owner is None:
        return
    original = owner.__dict__["__call__"]
    if hasattr(original, _CALL_WRAPPED):
        return

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        watching = [r for r in _ACTIVE if id(self) in r._called]
        if not watching:
            return original(self, *args, **kwargs)
        for r in watching:
            r._pre(self, args)
        out = None
        try:
            out = original(self, *args, **kwargs)
        finally:
            for r in watching:
                r._post(self, args, kwargs, out)
        return out

    setattr(__call__, _CALL_WRAPPED, original)
    __call__.__doc__ = original.__doc__
    type.__setattr__(owner, "__call__", __call__)


def loss_module_candidates(model: nn.Module | None) -> list[nn.Module]:
    """The submodules of ``model`` that may compute a loss: no trainable parameter, and a class
    that is not one of torch's own (``nn.*Loss`` modules are seen through the functional losses
    they call; activations, pooling and dropout are not losses). Empty for a plain model."""
    if model is None:
        return []
    trainable: dict[int, bool] = {}

    def has_trainable(m: nn.Module) -> bool:  # one bottom-up pass, shared submodules once
        known = trainable.get(id(m))
        if known is None:
            known = any(p.requires_grad for p in m.parameters(recurse=False))
            known = any([has_trainable(c) for c in m.children()]) or known
            trainable[id(m)] = known
        return known

    has_trainable(model)
    return [
        m for m in model.modules() if not type(m).__module__.startswith("torch.") and not trainable[id(m)]
    ]


class ModuleLossRecorder:
    """While entered, records loss-like module calls and ``Distribution.log_prob`` calls.

    The modules watched are :func:`loss_module_candidates` of ``model`` (custom losses and
    torchmetrics metrics kept as attributes; none on a plain model, which then pays nothing). A
    call counts as a loss call when its first argument is a floating-point tensor with more than
    one element and it returns a one-element floating-point tensor. Only the outermost such call
    is kept (a loss module calling another one inside is one loss). ``log_prob`` calls are
    recorded through :func:`_wrap_distributions`."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        #: the first floating-point tensor (more than one element) ``model``'s forward returned
        self.forward_output: Tensor | None = None
        self.calls: list[ModuleLossCall] = []
        self.log_probs: list[tuple[Any, Tensor, Tensor]] = []
        self._handles: list[Any] = []
        self._depth = 0
        self._lp_depth = 0
        #: ids of loss modules whose class overrides ``__call__`` (recorded by :func:`_wrap_call`)
        self._called: set[int] = set()

    # ------------------------------------------------------------------ modules
    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1

    def _post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        self._depth -= 1
        if self._depth != 0 or not isinstance(out, Tensor) or not out.is_floating_point() or out.numel() != 1:
            return
        at = self._prediction_at(args, kwargs)
        if at is None:
            return
        pred = kwargs[at] if isinstance(at, str) else args[at]
        others = [v for i, v in enumerate(args) if i != at] + [v for k, v in kwargs.items() if k != at]
        target = _first_tensor(others, lambda t: t is not pred)
        self.calls.append(
            ModuleLossCall(
                type(module).__name__,
                pred,
                target,
                dict(kwargs),
                out,
                tuple(args),
                fn=module,
                extra={"pred_at": at},
            )
        )

    def _prediction_at(self, args: tuple, kwargs: dict[str, Any]) -> int | str | None:
        """Where the prediction was passed (a position or a keyword): the model's own forward
        output if it is one of the arguments, else the only floating-point argument with a
        gradient, else the first floating-point argument (``loss(pred, target)``); never
        guessed from argument names (``loss(y=target, y_hat=pred)`` is read the same way)."""
        slots: list[tuple[int | str, Tensor]] = [
            (i, v) for i, v in enumerate(args) if isinstance(v, Tensor) and _is_prediction(v)
        ]
        slots += [(k, v) for k, v in kwargs.items() if isinstance(v, Tensor) and _is_prediction(v)]
        if not slots:
            return None
        out = self.forward_output
        if out is not None:
            for at, v in slots:
                if v is out or (v.numel() == out.numel() and _same_storage(v, out)):
                    return at
        grads = [at for at, v in slots if v.requires_grad]
        if len(grads) == 1:
            return grads[0]
        return slots[0][0]

    # ------------------------------------------------------------------ context
    def _on_forward(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.forward_output is None:
            self.forward_output = _first_tensor(out, _is_prediction)

    def __enter__(self) -> ModuleLossRecorder:
        if self.model is not None:
            self._handles.append(self.model.register_forward_hook(self._on_forward))
        for m in loss_module_candidates(self.model):
            if _own_call(type(m)) is not None:  # __call__ overridden: forward hooks never run
                _wrap_call(type(m))
                self._called.add(id(m))
                continue
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        _wrap_distributions()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def distribution_calls(self, loss: Tensor | None) -> list[ModuleLossCall]:
        """The recorded ``log_prob`` calls whose ``-mean`` / ``-sum`` (or ``+``) is ``loss``
        (the step's loss), as loss calls; without a loss, the ``-mean`` of each. When none
        matches the loss (a likelihood term plus a KL term, a penalty added), the ``-mean`` of
        each: the terms that may make the loss (the same with or without gradients, so a probe
        under ``no_grad`` reads the same loss call as one with them)."""
        out = self._distribution_calls(loss)
        if not out and loss is not None:
            out = self._distribution_calls(None)
        return out

    def _distribution_calls(self, loss: Tensor | None) -> list[ModuleLossCall]:
        out: list[ModuleLossCall] = []
        target = None if loss is None or loss.numel() != 1 else float(loss.detach().float().reshape(()))
        for dist, value, lp in self.log_probs:
            mean = _distribution_mean(dist)
            if mean is None:
                continue
            match = ("mean", -1.0)
            if target is not None:
                match = None
                for reduce in ("mean", "sum"):
                    v = float((lp.mean() if reduce == "mean" else lp.sum()).detach().float())
                    for sign in (-1.0, 1.0):
                        if abs(sign * v - target) <= 1e-5 * max(1.0, abs(target)):
                            match = (reduce, sign)
                            break
                    if match:
                        break
                if match is None:
                    continue
            value_out = match[1] * (lp.mean() if match[0] == "mean" else lp.sum())
            out.append(
                ModuleLossCall(
                    f"{type(dist).__name__}.log_prob",
                    mean,
                    value,
                    {},
                    value_out,
                    (dist, value),
                    fn=None,
                    kind="distribution",
                    distribution=dist,
                    reduce=match[0],
                    sign=match[1],
                    extra={"log_prob": lp},
                )
            )
        return out


# ---------------------------------------------------------------------------- know-nothing references
def _rows(x: Tensor, dim: int) -> Tensor:
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _class_dim(x: Tensor, target: Tensor) -> int | None:
    """The class dimension of scores ``x`` for integer ``target``: the dimension missing from
    the target's shape (dim 1, or the last one), with more classes than the largest label."""
    if x.dim() < 1 or target.numel() == 0:
        return None
    top = int(target.max())
    for dim in (1, x.dim() - 1) if x.dim() > 1 else (0,):
        c = x.shape[dim]
        if c < 2 or c <= top:
            continue
        rest = tuple(s for i, s in enumerate(x.shape) if i != dim)
        if x.dim() == 1 or math.prod(rest) == target.numel():
            return dim
    return None


def uniform_scores(x: Tensor, dim: int) -> Tensor:
    """Uniform class scores in the format of ``x``: probabilities (rows in [0, 1] summing to
    1), log-probabilities (rows logsumexp to 0) or logits (zeros)."""
    c = x.shape[dim]
    rows = _rows(x.detach().float(), dim)
    sums = rows.sum(dim=1)
    if bool(((rows >= 0) & (rows <= 1)).all()) and bool(((sums - 1).abs() < 1e-3).all()):
        return torch.full_like(x, 1.0 / c)
    if bool((torch.logsumexp(rows, dim=1).abs() < 1e-3).all()):
        return torch.full_like(x, -math.log(c))
    return torch.zeros_like(x)


def _mean_target(x: Tensor, target: Tensor) -> Tensor | None:
    """``x``-shaped constant: the target mean, when the target lines up with the prediction
    (same shape, broadcastable, or one trailing dimension fewer: quantiles, distribution
    parameters)."""
    if not target.is_floating_point() or target.numel() == 0:
        return None
    shapes = [tuple(target.shape), (*target.shape, 1)]
    ok = False
    for shape in shapes:
        try:
            ok = tuple(torch.broadcast_shapes(tuple(x.shape), shape)) == tuple(x.shape)
        except RuntimeError:
            continue
        if ok:
            break
    if not ok or target.numel() * 16 < x.numel() // max(1, x.shape[-1]):
        return None
    finite = target.detach()[torch.isfinite(target.detach())]
    if finite.numel() == 0:
        return None
    return torch.full_like(x, float(finite.float().mean()))


def know_nothing_candidates(call: Any) -> list[tuple[Any, str]]:
    """Know-nothing predictions for any loss call, each with its kind: uniform class scores
    (:data:`CHANCE`) for integer class targets, the target mean (:data:`MEAN_PREDICTOR`) for a
    float target that lines up with the prediction, and the batch-mean prediction
    (:data:`CONSTANT`: what a model that ignores its input and outputs its average, i.e. its
    output layer reduced to the bias, would predict). For a distribution loss: a distribution of
    the same family fitted to the target (mean and spread), and the batch-mean parameters."""
    x = call.input.detach()
    target = call.target if isinstance(call.target, Tensor) else None
    out: list[tuple[Any, str]] = []
    if getattr(call, "kind", "") == "distribution":
        return _distribution_candidates(call)
    if target is not None and not target.is_floating_point() and target.dtype is not torch.bool:
        dim = _class_dim(x, target)
        if dim is not None:
            out.append((uniform_scores(x, dim), CHANCE))
    elif target is not None:
        mean = _mean_target(x, target)
        if mean is not None:
            out.append((mean, MEAN_PREDICTOR))
    if x.dim() >= 1 and x.shape[0] > 1:
        out.append((x.mean(dim=0, keepdim=True).expand_as(x), CONSTANT))
    return out


def _distribution_candidates(call: ModuleLossCall) -> list[tuple[Any, str]]:
    dist, value = call.distribution, call.args[1]
    params = _distribution_params(dist)
    out: list[tuple[Any, str]] = []
    if not params or not all(isinstance(v, Tensor) for v in params.values()):
        return out
    v = value.detach().float()
    if {"loc", "scale"} <= set(params) and v.numel() > 1:
        fitted = dict(params)
        fitted["loc"] = torch.full_like(params["loc"], float(v.mean()))
        fitted["scale"] = torch.full_like(params["scale"], max(float(v.std()), 1e-6))
        try:
            out.append((type(dist)(**fitted), MEAN_PREDICTOR))
        except Exception:
            pass
    averaged = {
        n: (t.detach().mean(dim=0, keepdim=True).expand_as(t) if t.dim() >= 1 and t.shape[0] > 1 else t)
        for n, t in params.items()
    }
    try:
        out.append((type(dist)(**averaged), CONSTANT))
    except Exception:
        pass
    return out


def _distribution_params(dist: Any) -> dict[str, Any]:
    """The constructor parameters of a distribution, read by ``arg_constraints``: stored ones,
    or properties (a ``TransformedDistribution`` such as ``LogNormal`` keeps them in its base).
    A distribution built from one of two alternative parameters (``probs`` / ``logits``) keeps
    the one it was given."""
    names = list(getattr(dist, "arg_constraints", {}))
    stored = {n: dist.__dict__[n] for n in names if n in dist.__dict__}
    if stored:
        return stored
    out: dict[str, Any] = {}
    for n in names:
        try:
            value = getattr(dist, n)
        except Exception:
            continue
        if isinstance(value, Tensor):
            out[n] = value
    return out


def know_nothing_loss(call: Any, prefer: str | None = None) -> tuple[Tensor, str] | None:
    """The lowest finite loss among :func:`know_nothing_candidates` through the same loss call,
    and its kind (the candidate of kind ``prefer`` when there is one); ``None`` when there is
    none."""
    best: tuple[Tensor, str] | None = None
    with torch.no_grad():
        for pred, kind in know_nothing_candidates(call):
            try:
                loss = call.recompute(pred)
            except Exception:
                continue
            if not isinstance(loss, Tensor) or not loss.is_floating_point():
                continue
            value = loss.detach().float()
            value = value if value.dim() == 0 else value.mean()
            if not bool(torch.isfinite(value)):
                continue
            if kind == prefer:
                return value, kind
            if best is None or float(value) < float(best[0]):
                best = (value, kind)
    return best


def label_free_ratio(call: Any, chance_pred: Tensor) -> float | None:
    """For an integer-class loss: the loss averaged over every possible label, as a ratio to that
    of the uniform prediction ``chance_pred`` (1 when the predictions are as uninformed as
    uniform, whatever labels the batch holds); ``None`` when it cannot be computed."""
    target = call.target
    if not isinstance(target, Tensor) or target.is_floating_point():
        return None
    dim = _class_dim(call.input.detach(), target)
    if dim is None:
        return None
    c = call.input.shape[dim]
    if c > MAX_LABELS:
        return None
    pred, base = 0.0, 0.0
    with torch.no_grad():
        for label in range(c):
            t = torch.full_like(target, label)
            try:
                pred += float(call.recompute(call.input.detach(), t).float().mean())
                base += float(call.recompute(chance_pred, t).float().mean())
            except Exception:
                return None
    if not (math.isfinite(pred) and math.isfinite(base)) or base <= 0:
        return None
    return pred / base


def ideal_prediction(call: Any) -> Any | None:
    """The best possible prediction for hard targets, in the loss's format, or ``None``: the
    target itself (broadcast over a trailing dimension: quantiles) for a float target that lines
    up with the prediction; confident one-hot scores (logits, log-probabilities or
    probabilities, as the prediction looks) for integer class targets."""
    if getattr(call, "kind", "") == "distribution":
        return None
    x = call.input.detach()
    target = call.target if isinstance(call.target, Tensor) else None
    if target is None:
        return None
    if target.is_floating_point():
        if _mean_target(x, target) is None:
            return None
        t = target.detach().to(x.dtype)
        return (t if t.dim() == x.dim() else t.unsqueeze(-1)).expand_as(x).clone()
    dim = _class_dim(x, target)
    if dim is None:
        return None
    c = x.shape[dim]
    onehot = torch.nn.functional.one_hot(target.long().clamp(0, c - 1), c).to(x.dtype)
    onehot = onehot.reshape(*[s for i, s in enumerate(x.shape) if i != dim], c).movedim(-1, dim)
    uniform = uniform_scores(x, dim)
    if float(uniform.flatten()[0]) == 1.0 / c:
        return onehot.clamp(1e-6, 1 - 1e-6)
    if float(uniform.flatten()[0]) < 0:
        return torch.where(onehot > 0, torch.zeros_like(onehot), torch.full_like(onehot, -30.0))
    return onehot * 30.0


def prediction_view(call: Any) -> tuple[str, Tensor, Tensor] | None:
    """Per-example predictions of any loss call, for following them over training:
    ``("classification", probabilities (N, C), integer targets (N,))`` for integer class targets
    (the scores read as probabilities, log-probabilities or logits, as they look), or
    ``("regression", predictions (N,), targets (N,))`` for a float target that lines up with
    the prediction (a trailing dimension of quantiles or samples averaged; a distribution's
    mean). ``None`` when neither fits."""
    x = call.input.detach()
    target = call.target if isinstance(call.target, Tensor) else None
    if target is None:
        return None
    if not target.is_floating_point() and target.dtype is not torch.bool:
        dim = _class_dim(x, target)
        if dim is None:
            return None
        rows = _rows(x.float(), dim)
        uniform = uniform_scores(x, dim)
        first = float(uniform.flatten()[0]) if uniform.numel() else 0.0
        c = x.shape[dim]
        if first == 1.0 / c:
            probs = rows
        elif first < 0:
            probs = rows.exp()
        else:
            probs = rows.softmax(dim=1)
        return "classification", probs, target.detach().reshape(-1).long()
    if _mean_target(x, target) is None:
        return None
    t = target.detach().float()
    pred = x.float()
    if t.dim() == pred.dim() - 1 and pred.shape[:-1] == t.shape:
        pred = pred.mean(dim=-1)
    try:
        pred, t = torch.broadcast_tensors(pred, t)
    except RuntimeError:
        return None
    return "regression", pred.reshape(-1), t.reshape(-1)


def step_call(
    name: str, model: nn.Module, output: Tensor, loss: Tensor, target: Any, rerun: Callable[[], Any]
) -> ModuleLossCall:
    """A loss call for a step whose loss no loss call explains (a plain Python loss function, a
    loss method of a submodule): the prediction is ``model``'s forward output, the target the
    batch's own (``target``, read by layout, may be ``None``), and ``recompute(p)`` reruns the
    whole step (``rerun() -> loss``) with the forward output replaced by ``p``."""

    def fn(new_input: Tensor) -> Tensor:
        def swap(module: nn.Module, args: Any, out: Any) -> Any:
            if isinstance(out, Tensor):
                return new_input
            old = _first_tensor(out, _is_prediction)
            return out if old is None else _replace_tensor(out, old, new_input)

        handle = model.register_forward_hook(swap)
        try:
            value = rerun()
        finally:
            handle.remove()
        if not isinstance(value, Tensor):
            raise ValueError("the step returned no loss when rerun")
        return value

    return ModuleLossCall(name, output, target, {}, loss.reshape(()), (output,), fn=fn, kind="step")


def unexplained_step(
    recorder: ModuleLossRecorder,
    result: Any,
    model: nn.Module,
    batch: Any,
    name: str,
    find_loss: Callable[[Any], Tensor | None],
    step: Callable[[], Any],
) -> list[ModuleLossCall]:
    """``[step_call(...)]`` when no loss call explains the step's loss (``result.main_call`` is
    ``None``) and the model's forward output was seen, else ``[]``; the target is the batch's
    own, read by its layout (the last fallback)."""
    output = recorder.forward_output
    loss = result.loss
    if loss is None or loss.numel() != 1 or output is None or result.main_call is not None:
        return []
    try:
        target = BatchAdapter().target(batch)
    except Exception:
        target = None
    return [step_call(name, model, output, loss, target, lambda: find_loss(step()))]


def detach_non_leaf_state(module: nn.Module, memo: dict[int, Any]) -> None:
    """Put detached copies of the tensors that modules keep as plain attributes and that are not
    graph leaves (a torchmetrics ``Metric`` used as a loss keeps its accumulated state with the
    step's graph) into the deepcopy ``memo``: ``deepcopy`` refuses non-leaf tensors."""
    for m in module.modules():
        for value in vars(m).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            for t in items:
                if isinstance(t, Tensor) and t.grad_fn is not None and id(t) not in memo:
                    memo[id(t)] = t.detach().clone()
