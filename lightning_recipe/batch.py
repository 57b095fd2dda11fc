"""Finding the input and the target in a batch; zeroing inputs; slicing samples.

Checks need "the input" (to zero it, to take a gradient with respect to it, to look at it) and
"the target" (to count classes). Batches come in every shape, so :class:`BatchAdapter` reads
the common layouts and takes ``get_input`` / ``get_target`` callables for anything else:

* a bare tensor: it is the input, there is no target;
* a tuple / list (or namedtuple): the first tensor is the input, the second the target (the
  first tensor of a nested ``(target, weight)``);
* a dict (or any mapping): the first of :data:`INPUT_KEYS` / :data:`TARGET_KEYS` present;
* an object with attributes named like those keys (a dataclass, a ``SimpleNamespace``, a
  graph batch whose attributes live in a store, listed by ``keys()``);
* anything else that holds tensors: the first floating-point tensor that is not the target
  (the first integer tensor, token ids, when there is no float one).

Every container is walked (nested dicts, lists, tuples, namedtuples, dataclasses, objects
holding tensors as attributes) and rebuilt with its type intact. A batch that concatenates
variable-size samples with an assignment vector (graph batches: the nodes of many graphs in
one tensor, ``batch[i]`` = the graph of node i) counts its samples as graphs, and
:meth:`BatchAdapter.slice` keeps whole graphs (:class:`GraphLayout`).

When it cannot tell, it raises :class:`BatchLayoutError`, whose message names the
``get_input`` / ``get_target`` arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from torch import Tensor

INPUT_KEYS: tuple[str, ...] = (
    "x",
    "input",
    "inputs",
    "image",
    "images",
    "img",
    "features",
    "input_ids",
    "data",
    "src",
    "tokens",
)
TARGET_KEYS: tuple[str, ...] = (
    "y",
    "label",
    "labels",
    "target",
    "targets",
    "tgt",
    "class",
    "classes",
)

Getter = Callable[[Any], Any]


class BatchLayoutError(ValueError):
    """The batch layout could not be read; the message says which argument to pass."""


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "dict with keys " + ", ".join(repr(k) for k in list(batch)[:12])
    if isinstance(batch, (list, tuple)):
        inner = ", ".join(_describe(b) for b in list(batch)[:6])
        return f"{type(batch).__name__} of {len(batch)} [{inner}]"
    return type(batch).__name__


#: how deep containers are walked (a guard against cyclic objects)
MAX_DEPTH = 8


def object_fields(obj: Any) -> list[str] | None:
    """The attribute names under which an object that is not a container holds tensors (a
    dataclass's fields; ``keys()`` of a store-backed batch such as torch_geometric's ``Batch``;
    else its public instance attributes), or ``None`` when it holds none directly or in a
    container: such an object is opaque and kept as it is."""
    if isinstance(obj, (Tensor, Mapping, list, tuple, str, bytes, type)) or obj is None:
        return None
    if isinstance(obj, torch.nn.Module):
        return None
    if is_dataclass(obj):
        names = [f.name for f in fields(obj)]
    else:
        names = []
        try:  # a method (torch_geometric >= 2.4) or a property (older releases)
            keys = obj.keys() if callable(getattr(type(obj), "keys", None)) else getattr(obj, "keys", None)
            if isinstance(keys, (list, tuple)) or hasattr(keys, "__iter__"):
                names = [k for k in keys if isinstance(k, str)]
        except Exception:
            names = []
        if not names:
            try:
                names = [k for k in vars(obj) if not k.startswith("_")]
            except TypeError:
                return None
    found = []
    for name in names:
        try:
            value = getattr(obj, name)
        except Exception:
            continue
        if isinstance(value, Tensor) or (isinstance(value, (Mapping, list, tuple)) and _holds_tensor(value)):
            found.append(name)
    return found or None


def _holds_tensor(value: Any, depth: int = 0) -> bool:
    if isinstance(value, Tensor):
        return True
    if depth > 2:
        return False
    if isinstance(value, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in list(value.values())[:64])
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in list(value)[:64])
    return False


def _set_attrs(obj: Any, changes: dict[str, Any]) -> Any:
    """A shallow copy of the (non-dataclass) object ``obj`` with attributes replaced, its type
    intact (``copy.copy``, then ``setattr``, or ``object.__setattr__`` for frozen ones);
    ``obj`` itself when it cannot be copied."""
    if is_dataclass(obj):
        return _replace(obj, changes)
    try:
        new = copy.copy(obj)
    except Exception:
        return obj
    for name, value in changes.items():
        try:
            setattr(new, name, value)
        except Exception:
            try:
                object.__setattr__(new, name, value)
            except Exception:
                return obj
    return new


def leaf_paths(batch: Any) -> list[tuple[tuple[Any, ...], Tensor]]:
    """``(path, tensor)`` for every tensor of a nested batch, in :func:`map_tensors` order; a
    path reads back with :func:`get_path`."""
    out: list[tuple[tuple[Any, ...], Tensor]] = []

    def walk(value: Any, path: tuple[Any, ...], depth: int) -> None:
        if isinstance(value, Tensor):
            out.append((path, value))
            return
        if depth > MAX_DEPTH:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, (*path, k), depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, (*path, i), depth + 1)
        else:
            for name in object_fields(value) or ():
                walk(getattr(value, name), (*path, name), depth + 1)

    walk(batch, (), 0)
    return out


def _skip_metadata(batch: Sequence[Any]) -> int:
    """Index of the first element of a tuple batch that holds a floating-point tensor when the
    elements before it hold none (``(meta, x, y)``: ids and paths first), else 0."""
    if not batch or isinstance(batch[0], Tensor) or len(batch) < 3:
        return 0
    for i, item in enumerate(batch[:-1]):
        if any(t.is_floating_point() for _, t in leaf_paths(item)):
            return i
    return 0


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype is not torch.bool


def _structural_input(batch: Any, exclude: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """The path of the first floating-point tensor with a batch dimension that is not the target
    (``exclude``), else of the first such integer tensor (token ids)."""
    leaves = [
        (p, t)
        for p, t in leaf_paths(batch)
        if t.dim() > 0 and (exclude is None or p[: len(exclude)] != exclude)
    ]
    for p, t in leaves:
        if t.is_floating_point():
            return p
    for p, t in leaves:
        if _is_int(t):
            return p
    return None


def _key_lookup(batch: Any, keys: Sequence[str]) -> tuple[str, Any] | None:
    if isinstance(batch, Mapping):
        lowered = {str(k).lower(): k for k in batch}
        for key in keys:
            if key in lowered:
                return lowered[key], batch[lowered[key]]
        return None
    if _is_namedtuple(batch):
        named = {f.lower(): f for f in batch._fields}
        for key in keys:
            if key in named:
                return named[key], getattr(batch, named[key])
        return None
    if is_dataclass(batch) and not isinstance(batch, type):
        names = {f.name.lower(): f.name for f in fields(batch)}
        for key in keys:
            if key in names:
                return names[key], getattr(batch, names[key])
        return None
    names = object_fields(batch)
    if names:
        attrs = {k.lower(): k for k in names}
        for key in keys:
            if key in attrs:
                return attrs[key], getattr(batch, attrs[key])
    return None


class BatchAdapter:
    """Reads the input and the target of a batch, for every check that needs them.

    Args:
        get_input: ``callable(batch) -> Tensor`` returning the model input; overrides the guess.
        get_target: ``callable(batch) -> Tensor | None`` returning the target; overrides the guess.

    Example::

        adapter = BatchAdapter(get_input=lambda b: b["pixels"], get_target=lambda b: b["digit"])
        x = adapter.input(batch)
    """

    def __init__(self, get_input: Getter | None = None, get_target: Getter | None = None) -> None:
        for name, fn in (("get_input", get_input), ("get_target", get_target)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be a callable taking the batch, got {type(fn).__name__}")
        self.get_input = get_input
        self.get_target = get_target

    # -------------------------------------------------------------- locate
    def locate_input(self, batch: Any) -> tuple[Any, ...]:
        """Path to the input inside the batch (``()`` for a bare tensor, ``(0,)``, ``("x",)``,
        ``(0, "encoder_cont")``)."""
        if isinstance(batch, Tensor):
            return ()
        if isinstance(batch, Mapping) or not isinstance(batch, (list, tuple)) or _is_namedtuple(batch):
            hit = _key_lookup(batch, INPUT_KEYS)
            if hit is not None:
                return (hit[0],)
        if isinstance(batch, (list, tuple)) and batch:
            start = _skip_metadata(batch)
            first = batch[start]
            if isinstance(first, Tensor):
                return (start,)
            if isinstance(first, (Mapping, list, tuple)) or object_fields(first):
                try:
                    path = (start, *self.locate_input(first))
                except BatchLayoutError:
                    path = None
                if path is not None and _get_path(batch, path).is_floating_point():
                    return path
        path = _structural_input(batch, self.locate_target(batch))
        if path is not None:
            return path
        raise BatchLayoutError(
            f"lightning_recipe could not find the model input in a batch of type {_describe(batch)}; "
            f"pass get_input=lambda batch: ... (and get_target=...) to the callback, "
            f"or use one of the keys {list(INPUT_KEYS)}."
        )

    def locate_target(self, batch: Any) -> tuple[Any, ...] | None:
        """Path to the target inside the batch, or ``None`` when the batch has none."""
        if isinstance(batch, Tensor):
            return None
        if isinstance(batch, Mapping) or not isinstance(batch, (list, tuple)) or _is_namedtuple(batch):
            hit = _key_lookup(batch, TARGET_KEYS)
            if hit is not None:
                return (hit[0],)
            if isinstance(batch, Mapping) or not isinstance(batch, (list, tuple)):
                return None
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            i = _skip_metadata(batch) + 1
            if i >= len(batch):
                return None
            if isinstance(batch[i], Tensor):
                return (i,)
            if isinstance(batch[i], (list, tuple)) and batch[i] and isinstance(batch[i][0], Tensor):
                return (i, 0)  # (x, (target, weight)), as forecasting libraries batch
        return None

    # -------------------------------------------------------------- read
    def input(self, batch: Any) -> Tensor:
        """The model input (a tensor)."""
        if self.get_input is not None:
            value = self.get_input(batch)
            if not isinstance(value, Tensor):
                raise BatchLayoutError(
                    f"`get_input` must return a Tensor, it returned {type(value).__name__}"
                )
            return value
        value = _get_path(batch, self.locate_input(batch))
        if not isinstance(value, Tensor):
            raise BatchLayoutError(
                f"the guessed input in a batch of type {_describe(batch)} is a "
                f"{type(value).__name__}, not a Tensor; pass get_input=lambda batch: ... to the callback"
            )
        return value

    def target(self, batch: Any) -> Tensor | None:
        """The target tensor, or ``None`` when the batch carries none."""
        if self.get_target is not None:
            value = self.get_target(batch)
            if value is not None and not isinstance(value, Tensor):
                raise BatchLayoutError(
                    f"`get_target` must return a Tensor or None, it returned {type(value).__name__}"
                )
            return value
        if self.get_input is not None and not isinstance(batch, (Mapping, list, tuple)):
            return None
        path = self.locate_target(batch)
        if path is None:
            return None
        value = _get_path(batch, path)
        return value if isinstance(value, Tensor) else None

    def batch_size(self, batch: Any) -> int:
        """Number of samples: the first dimension of the input, or for a graph batch (see
        :meth:`graph`) the number of graphs."""
        x = self.input(batch)
        if x.dim() == 0:
            raise BatchLayoutError("the batch input is a 0-d tensor; it has no batch dimension")
        layout = self.graph(batch, x)
        return layout.num_samples if layout is not None else int(x.shape[0])

    def graph(self, batch: Any, x: Tensor | None = None) -> GraphLayout | None:
        """The layout of a batch that concatenates variable-size samples (graph batches), or
        ``None``: see :func:`graph_layout`."""
        if isinstance(batch, Tensor):
            return None
        if x is None:
            x = self.input(batch)
        target = self.target(batch)
        return graph_layout(batch, x, exclude=(target,) if target is not None else ())

    # -------------------------------------------------------------- transform
    def with_input(self, batch: Any, new_input: Tensor) -> Any:
        """A shallow copy of ``batch`` with the input replaced (the original is untouched).

        With ``get_input`` the tensor it returns is replaced wherever the batch holds it; a getter
        that computes a new tensor (``b[0].float()``) cannot be inverted, which raises
        :class:`BatchLayoutError` rather than handing back the batch unchanged."""
        if self.get_input is not None:
            old = self.get_input(batch)
            out = map_tensors(batch, lambda t: new_input if t is old else t)
            if self.get_input(out) is not new_input:
                raise BatchLayoutError(
                    "`get_input` returned a tensor that is not stored in the batch (a computed one, "
                    "e.g. b[0].float(), or one inside an object lightning_recipe cannot copy), so the "
                    "input cannot be replaced; make get_input return the batch's own tensor and do "
                    "conversions in the model"
                )
            return out
        return _set_path(batch, self.locate_input(batch), new_input)

    def zero_inputs(self, batch: Any) -> Any:
        """A copy of ``batch`` whose input is all zeros (same shape, dtype and device)."""
        return self.with_input(batch, torch.zeros_like(self.input(batch)))

    def slice(self, batch: Any, k: int) -> Any:
        """The first ``k`` samples of ``batch``: every tensor (or list) whose first dimension
        is the batch size is sliced, everything else is kept as is."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}")
        x = self.input(batch)
        layout = self.graph(batch, x) if x.dim() > 0 else None
        if layout is not None:
            return layout.slice(batch, k)
        n = self.batch_size(batch)
        return slice_batch(batch, n, k)


def get_path(batch: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` (from :func:`leaf_paths` or ``locate_*``) inside ``batch``."""
    return _get_path(batch, path)


def _get_path(batch: Any, path: tuple[Any, ...]) -> Any:
    value = batch
    for key in path:
        if isinstance(key, str) and not isinstance(value, Mapping):
            value = getattr(value, key)
        elif isinstance(value, (Mapping, list, tuple)):
            value = value[key]
        else:
            value = getattr(value, key)
    return value


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    """A shallow copy of the dataclass ``obj`` with ``changes`` applied, its type intact.

    Unlike ``dataclasses.replace`` it does not call ``__init__`` again, so ``InitVar`` fields
    (which a rebuilt instance would need and the instance does not keep), ``__post_init__``
    side effects and frozen classes are all fine: the fields are set on a copy directly."""
    new = copy.copy(obj)
    for name, value in changes.items():
        object.__setattr__(new, name, value)
    return new


def _set_path(batch: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(batch, Mapping):
        out = dict(batch) if type(batch) is not dict else batch.copy()
        out[key] = _set_path(batch[key], rest, new)
        try:
            return type(batch)(out) if type(batch) is not dict else out
        except TypeError:
            return out
    if _is_namedtuple(batch):
        if isinstance(key, int):
            key = batch._fields[key]
        return batch._replace(**{key: _set_path(getattr(batch, key), rest, new)})
    if isinstance(batch, (list, tuple)):
        items = list(batch)
        items[key] = _set_path(items[key], rest, new)
        return type(batch)(items) if isinstance(batch, list) else tuple(items)
    if is_dataclass(batch) and not isinstance(batch, type):
        return _replace(batch, {key: _set_path(getattr(batch, key), rest, new)})
    out = _set_attrs(batch, {key: _set_path(getattr(batch, key), rest, new)})
    if out is batch:
        raise BatchLayoutError(
            f"a batch of type {type(batch).__name__} could not be copied to replace {key!r}"
        )
    return out


def map_tensors(batch: Any, fn: Callable[[Tensor], Any], _depth: int = 0) -> Any:
    """Apply ``fn`` to every tensor in a nested batch, keeping the containers' types (objects
    holding tensors as attributes are shallow-copied with the attributes replaced)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if _depth > MAX_DEPTH:
        return batch
    d = _depth + 1
    if isinstance(batch, Mapping):
        out = {k: map_tensors(v, fn, d) for k, v in batch.items()}
        if type(batch) is dict:
            return out
        try:
            return type(batch)(out)
        except TypeError:
            return out
    if _is_namedtuple(batch):
        return type(batch)(*(map_tensors(v, fn, d) for v in batch))
    if isinstance(batch, (list, tuple)):
        items = [map_tensors(v, fn, d) for v in batch]
        return items if isinstance(batch, list) else tuple(items)
    if is_dataclass(batch) and not isinstance(batch, type):
        return _replace(batch, {f.name: map_tensors(getattr(batch, f.name), fn, d) for f in fields(batch)})
    names = object_fields(batch)
    if not names:
        return batch
    return _set_attrs(batch, {n: map_tensors(getattr(batch, n), fn, d) for n in names})


def tensor_leaves(batch: Any) -> list[Tensor]:
    """Every tensor of a nested batch, in the order :func:`map_tensors` visits them."""
    out: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        out.append(t)
        return t

    map_tensors(batch, keep)
    return out


class LeafGetter:
    """``get_input`` for the ``index``-th tensor of a batch (in :func:`tensor_leaves` order): an
    input found by watching which tensor the model reads, not by its key or position."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, batch: Any) -> Tensor:
        leaves = tensor_leaves(batch)
        if self.index >= len(leaves):
            raise BatchLayoutError(f"the batch has {len(leaves)} tensors, the input was tensor {self.index}")
        return leaves[self.index]

    def __repr__(self) -> str:
        return f"LeafGetter({self.index})"


def slice_batch(batch: Any, n: int, k: int) -> Any:
    """The first ``k`` of ``n`` samples of any batch structure (tensors and lists of length n)."""

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value[:k] if value.dim() > 0 and value.shape[0] == n else value
        if isinstance(value, Mapping):
            out = {key: cut(v) for key, v in value.items()}
            if type(value) is dict:
                return out
            try:
                return type(value)(out)
            except TypeError:
                return out
        if _is_namedtuple(value):
            return type(value)(*(cut(v) for v in value))
        if (
            isinstance(value, list)
            and len(value) == n
            and n != k
            and not any(isinstance(v, Tensor) for v in value)
        ):
            return value[:k]
        if isinstance(value, (list, tuple)):
            items = [cut(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if is_dataclass(value) and not isinstance(value, type):
            return _replace(value, {f.name: cut(getattr(value, f.name)) for f in fields(value)})
        names = object_fields(value)
        if names:
            return _set_attrs(value, {name: cut(getattr(value, name)) for name in names})
        return value

    return cut(batch)


#: names an assignment vector goes by when the batch has no edge index to confirm it
ASSIGNMENT_NAMES = ("batch", "batch_idx", "batch_index", "graph_index", "segment_ids", "node_graph")


@dataclass
class GraphLayout:
    """A batch that concatenates variable-size samples: ``assignment[i]`` is the sample (graph)
    of row ``i`` of the node-level tensors (sorted, as torch_geometric and chemistry libraries
    collate), edge indices ``(2, E)`` point at rows. ``num_samples`` graphs of ``num_nodes``
    nodes in all."""

    assignment: Tensor
    assignment_path: tuple[Any, ...]
    num_nodes: int
    num_samples: int
    edge_paths: list[tuple[Any, ...]]

    def slice(self, batch: Any, k: int) -> Any:
        """The first ``k`` graphs: node-level tensors cut to their nodes, edge indices (and
        edge-level tensors) to the edges between them, graph-level tensors to ``k`` rows, a
        ``ptr`` of ``num_samples + 1`` offsets to ``k + 1``, an int attribute counting the graphs
        (``num_graphs``) set to ``k``."""
        if k >= self.num_samples:
            return batch
        keep_nodes = int((self.assignment < k).sum())
        replace: dict[int, Tensor] = {}
        edge_masks: dict[int, Tensor] = {}
        leaves = leaf_paths(batch)
        for path, t in leaves:
            if path in self.edge_paths:
                mask = (t < keep_nodes).all(dim=0)
                edge_masks[int(t.shape[1])] = mask
                replace[id(t)] = t[:, mask]
        for _, t in leaves:
            if id(t) in replace or t.dim() == 0:
                continue
            rows = int(t.shape[0])
            if rows == self.num_nodes:
                replace[id(t)] = t[:keep_nodes]
            elif rows in edge_masks and rows not in (self.num_samples, self.num_samples + 1):
                replace[id(t)] = t[edge_masks[rows]]
            elif rows == self.num_samples:
                replace[id(t)] = t[:k]
            elif rows == self.num_samples + 1 and t.dim() == 1 and _is_int(t):
                replace[id(t)] = t[: k + 1]
        out = map_tensors(batch, lambda t: replace.get(id(t), t))
        _recount(out, self.num_samples, k)
        return out


def _recount(obj: Any, n: int, k: int) -> None:
    """Set int attributes that count the graphs (``num_graphs``, ``_num_graphs``) from n to k."""
    try:
        attrs = vars(obj)
    except TypeError:
        return
    for name, value in list(attrs.items()):
        if isinstance(value, int) and not isinstance(value, bool) and value == n and "graph" in name.lower():
            try:
                object.__setattr__(obj, name, k)
            except Exception:
                pass


def graph_layout(batch: Any, x: Tensor, exclude: tuple[Tensor, ...] = ()) -> GraphLayout | None:
    """The :class:`GraphLayout` of ``batch`` whose input ``x`` has one row per node, or ``None``.

    The assignment vector is a 1-d integer tensor (not ``x``, not the batch's target) with one
    entry per row of ``x``, sorted, starting at 0, taking every value up to its largest, with
    fewer values than rows; it counts when an edge index (a ``(2, E)`` integer tensor whose
    entries are rows of ``x``) confirms the node layout, or when it is named like one
    (:data:`ASSIGNMENT_NAMES`)."""
    if x.dim() == 0:
        return None
    n = int(x.shape[0])
    leaves = leaf_paths(batch)
    candidates = [
        (p, t)
        for p, t in leaves
        if t is not x
        and all(t is not e for e in exclude)
        and t.dim() == 1
        and _is_int(t)
        and int(t.shape[0]) == n
        and n > 1
    ]
    if not candidates:
        return None
    edges = [
        p
        for p, t in leaves
        if t.dim() == 2
        and _is_int(t)
        and t.shape[0] == 2
        and t.numel() > 0
        and int(t.max()) < n
        and int(t.min()) >= 0
    ]
    for path, a in candidates:
        named = bool(path) and str(path[-1]).lower() in ASSIGNMENT_NAMES
        if not edges and not named:
            continue
        if int(a[0]) != 0 or bool((a[1:] < a[:-1]).any()):
            continue
        g = int(a[-1]) + 1
        if g >= n or int(torch.unique(a).numel()) != g:
            continue
        return GraphLayout(a, path, n, g, edges)
    return None


def to_dtype(batch: Any, dtype: torch.dtype) -> Any:
    """A copy of the batch with every floating-point tensor cast to ``dtype``."""
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


def detach_clone(batch: Any) -> Any:
    """A detached copy of every tensor in the batch (for keeping a batch across steps)."""
    return map_tensors(batch, lambda t: t.detach().clone())


class BatchStash:
    """Keeps detached copies of the first ``max_batches`` batches it is offered.

    Monitors that evaluate on validation data take their batches from the validation loop the
    trainer runs anyway (including the sanity check), instead of iterating the dataloader
    themselves, which would consume RNG and start workers. Feed it from
    ``on_validation_batch_start``: only dataloader 0 counts, batch indices 0, 1, ... are kept
    once each (a sanity check that saw fewer batches does not make the next run store batch 0
    twice), and with ``max_examples`` only the first examples are cut out before copying.

    Example::

        stash = BatchStash(max_batches=2, adapter=BatchAdapter(), max_examples=256)
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            stash.offer(batch, dataloader_idx, batch_idx)
    """

    def __init__(
        self, max_batches: int = 1, adapter: BatchAdapter | None = None, max_examples: int | None = None
    ) -> None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"`max_batches` must be a positive int, got {max_batches!r}")
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise ValueError(f"`max_examples` must be a positive int or None, got {max_examples!r}")
        self.max_batches = max_batches
        self.adapter = adapter or BatchAdapter()
        self.max_examples = max_examples
        self.batches: list[Any] = []

    @property
    def full(self) -> bool:
        return len(self.batches) >= self.max_batches

    def offer(self, batch: Any, dataloader_idx: int = 0, batch_idx: int | None = None) -> bool:
        """Keep ``batch`` if there is room, it comes from dataloader 0 and (when given)
        ``batch_idx`` is the next index missing; True if kept."""
        if self.full or dataloader_idx != 0:
            return False
        if batch_idx is not None and batch_idx != len(self.batches):
            return False
        if self.max_examples is not None:
            try:
                if self.adapter.batch_size(batch) > self.max_examples:
                    batch = self.adapter.slice(batch, self.max_examples)
            except BatchLayoutError:
                pass  # kept whole; the user of the batch reports the unreadable layout
        self.batches.append(detach_clone(batch))
        return True

    def clear(self) -> None:
        self.batches = []
