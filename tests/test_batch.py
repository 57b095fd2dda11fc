"""Finding the input / target in every common batch layout; zeroing; slicing."""

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from lightning_recipe.batch import BatchAdapter, BatchLayoutError, map_tensors, slice_batch

X = torch.randn(6, 3)
Y = torch.arange(6)
Pair = namedtuple("Pair", ["inputs", "targets"])


@dataclass
class Sample:
    image: torch.Tensor
    label: torch.Tensor


@pytest.mark.parametrize(
    "batch",
    [
        (X, Y),
        [X, Y],
        {"x": X, "y": Y},
        {"input": X, "label": Y},
        {"images": X, "targets": Y, "meta": ["a"] * 6},
        {"Features": X, "Labels": Y},
        Pair(X, Y),
        Sample(X, Y),
        ({"x": X}, Y),
    ],
)
def test_input_and_target_are_found(batch):
    a = BatchAdapter()
    assert a.input(batch) is X
    assert a.target(batch) is Y
    assert a.batch_size(batch) == 6


def test_bare_tensor_has_no_target():
    a = BatchAdapter()
    assert a.input(X) is X and a.target(X) is None


def test_dict_without_known_keys_is_read_by_structure():
    assert BatchAdapter().input({"pixels": X, "digit": Y}) is X  # the float tensor
    assert BatchAdapter().input({"digit": Y, "ids": X.long()}) is Y  # no float: the first integer one


def test_batch_without_tensors_names_the_arguments():
    with pytest.raises(BatchLayoutError, match="get_input"):
        BatchAdapter().input({"text": ["a", "b"], "n": 2})


def test_getters_override_the_guess_and_are_validated():
    batch = {"pixels": X, "digit": Y}
    a = BatchAdapter(get_input=lambda b: b["pixels"], get_target=lambda b: b["digit"])
    assert a.input(batch) is X and a.target(batch) is Y
    with pytest.raises(TypeError, match="get_input"):
        BatchAdapter(get_input="pixels")
    with pytest.raises(BatchLayoutError, match="get_input"):
        BatchAdapter(get_input=lambda b: "nope").input(batch)


@pytest.mark.parametrize("batch", [(X, Y), {"x": X, "y": Y}, Pair(X, Y), Sample(X, Y), ({"x": X, "m": X}, Y)])
def test_zero_inputs_copies_and_keeps_layout(batch):
    a = BatchAdapter()
    z = a.zero_inputs(batch)
    assert type(z) is type(batch)
    assert torch.equal(a.input(z), torch.zeros_like(X))
    assert a.target(z) is Y
    assert a.input(batch) is X  # original untouched
    assert float(X.abs().sum()) > 0


def test_zero_inputs_with_custom_getter():
    batch = {"pixels": X, "digit": Y}
    a = BatchAdapter(get_input=lambda b: b["pixels"])
    z = a.zero_inputs(batch)
    assert torch.equal(z["pixels"], torch.zeros_like(X)) and z["digit"] is Y


def test_slice_keeps_non_batch_things():
    batch = {"x": X, "y": Y, "names": list("abcdef"), "scale": torch.tensor(2.0), "vocab": torch.ones(7)}
    s = BatchAdapter().slice(batch, 2)
    assert s["x"].shape[0] == 2 and s["y"].tolist() == [0, 1]
    assert s["names"] == ["a", "b"] and s["scale"].item() == 2.0 and s["vocab"].shape == (7,)
    assert slice_batch((X, Y), 6, 3)[0].shape[0] == 3
    with pytest.raises(ValueError, match="k"):
        BatchAdapter().slice(batch, 0)


def test_map_tensors_keeps_containers():
    out = map_tensors({"a": [X, (Y,)], "b": "s"}, lambda t: t * 0)
    assert isinstance(out["a"], list) and isinstance(out["a"][1], tuple) and out["b"] == "s"


def test_with_input_refuses_a_getter_that_returns_a_computed_tensor():
    # get_input=lambda b: b[0].float() returns a new tensor that is not in the batch, so it cannot be
    # put back: zeroing must not hand back the batch unchanged (InputIndependentBaseline would then
    # compare the real loss with itself and call a healthy model input-independent)
    batch = (torch.ones(4, 3, dtype=torch.float64), Y[:4])
    a = BatchAdapter(get_input=lambda b: b[0].float())
    with pytest.raises(BatchLayoutError, match="get_input"):
        a.zero_inputs(batch)
    with pytest.raises(BatchLayoutError, match="get_input"):
        a.with_input(batch, torch.zeros(4, 3))


def test_dataclass_batches_with_initvar_and_frozen_are_rebuilt_with_their_type():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Graph:
        x: torch.Tensor
        y: torch.Tensor
        scale: dataclasses.InitVar[float] = 1.0

        def __post_init__(self, scale):
            if scale != 1.0:
                object.__setattr__(self, "x", self.x * scale)

    batch = Graph(torch.ones(4, 3), torch.zeros(4, dtype=torch.long), scale=2.0)
    adapter = BatchAdapter()
    zeroed = adapter.with_input(batch, torch.zeros(4, 3))
    assert type(zeroed) is Graph and torch.equal(zeroed.x, torch.zeros(4, 3)) and zeroed.y is batch.y
    assert torch.equal(batch.x, torch.full((4, 3), 2.0))  # the original is untouched
    assert type(adapter.slice(batch, 2)) is Graph and adapter.slice(batch, 2).x.shape == (2, 3)
