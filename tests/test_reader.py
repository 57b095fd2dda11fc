"""One reading of input, target, prediction and loss for third-party patterns (see
``reader_models``): batches through any container, graph batches counted by graph, losses that
are custom modules, torchmetrics metrics, distribution likelihoods or computed inside
``forward``, and a know-nothing reference for any loss."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from reader_models import (
    MPNN,
    Forecaster,
    FunctionLoss,
    GaussianNLL,
    GraphBatch,
    GraphNet,
    HFStyle,
    MolGraphBatch,
    TrainingBatch,
    forecast_loaders,
    graph_loaders,
    molecule_loaders,
    regression_loaders,
    token_loaders,
)

import lightning_recipe as lr
from hard_models import fit_suite
from lightning_recipe import _losses
from lightning_recipe._probe import CHANCE, MEAN_PREDICTOR, know_nothing_loss, run_step
from lightning_recipe.batch import BatchAdapter, leaf_paths

CHECK_FIGURES = {
    "DataInspectionCheck": "input_dtype",
    "LossAtInitCheck": "loss",
    "BatchIndependenceCheck": "max_leak",
    "GradientCheck": "max_relative_error",
    "OverfitBatchCheck": "best_loss",
}

PATTERNS = {
    "chemistry": (MPNN, molecule_loaders),
    "function": (FunctionLoss, regression_loaders),
    "forecasting": (Forecaster, forecast_loaders),
    "graph": (GraphNet, graph_loaders),
    "hf": (HFStyle, token_loaders),
    "distribution": (GaussianNLL, regression_loaders),
}


def first(loaders):
    return next(iter(loaders()[1]))


# ---------------------------------------------------------------------------- batches
def test_forecasting_batch_is_read_without_key_names():
    batch = first(forecast_loaders)
    a = BatchAdapter()
    assert a.locate_input(batch) == (0, "encoder_cont")
    assert a.locate_target(batch) == (1, 0)
    assert a.target(batch) is batch[1][0]
    assert a.batch_size(batch) == 16
    cut = a.slice(batch, 3)
    assert type(cut) is tuple and type(cut[0]) is dict and cut[1][1] is None
    assert all(v.shape[0] == 3 for v in cut[0].values())
    zero = a.zero_inputs(batch)
    assert float(zero[0]["encoder_cont"].abs().sum()) == 0
    assert zero[0]["encoder_cat"] is batch[0]["encoder_cat"]  # integer codes are not touched


def test_graph_batch_counts_and_slices_whole_graphs():
    batch = first(graph_loaders)
    a = BatchAdapter()
    assert a.input(batch) is batch.x and a.target(batch) is batch.y
    assert a.batch_size(batch) == batch.num_graphs == 16
    layout = a.graph(batch)
    assert layout is not None and layout.num_nodes == batch.x.shape[0]
    cut = a.slice(batch, 3)
    assert isinstance(cut, GraphBatch) and cut.num_graphs == 3
    nodes = int((batch.batch < 3).sum())
    assert cut.x.shape[0] == nodes and torch.equal(cut.batch, batch.batch[:nodes])
    assert int(cut.edge_index.max()) < nodes
    assert cut.edge_index.shape[1] == int((batch.edge_index < nodes).all(0).sum())
    assert batch.x.shape[0] > nodes  # the original is untouched
    leaf = batch.x.clone()
    assert a.with_input(batch, leaf).x is leaf and batch.x is not leaf


@pytest.mark.parametrize("node_level", [False, True])
@pytest.mark.parametrize("mix", [False, True])
def test_batch_mixing_is_charted_per_graph(node_level, mix):
    """Graph-level and node-level outputs: the gradient of graph i's output(s) is measured on the
    nodes of every other graph (by the assignment vector); healthy message passing stays inside
    a graph (leak 0), a normalisation over every node of the batch leaks."""
    torch.manual_seed(0)
    model = GraphNet(mix_graphs=mix)
    model.node_level = node_level
    check = lr.BatchIndependenceCheck()
    check.check(None, model, first(graph_loaders))
    assert check.figures["batch_size"] == 7 and "graphs" in check.figures["gradient_at"]
    assert check.figures["output"].startswith("the forward output")
    if mix:
        assert [f.code for f in check.findings] == ["batch-mixing"] and check.figures["max_leak"] > 0.01
    else:
        assert check.findings == [] and check.figures["max_leak"] == 0.0


def test_a_sorted_label_vector_is_not_an_assignment_vector():
    x, y = torch.randn(8, 3), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    assert BatchAdapter().graph((x, y)) is None
    assert BatchAdapter().graph({"x": x, "group": y}) is None  # no edge index, not named like one
    assert BatchAdapter().batch_size({"x": x, "batch": y}) == 3  # named like one


def test_objects_holding_tensors_are_walked_and_rebuilt():
    class Holder:
        def __init__(self, a, b):
            self.features, self.label, self.note = a, b, "x"

    x, y = torch.randn(4, 2), torch.arange(4)
    h = Holder(x, y)
    assert [p for p, _ in leaf_paths(h)] == [("features",), ("label",)]
    out = lr.batch.map_tensors(h, lambda t: t * 0)
    assert type(out) is Holder and out.note == "x" and float(out.features.abs().sum()) == 0
    assert h.features is x
    assert BatchAdapter().input({"pixels": x, "digit": y}) is x  # no known key: the float tensor


# ---------------------------------------------------------------------------- losses
def test_a_torchmetrics_metric_used_as_a_loss_is_the_main_call():
    model = Forecaster()
    batch = next(iter(forecast_loaders()[0]))
    result = run_step(model, batch)
    call = result.main_call
    assert call is not None and call.name == "QuantileLoss" and call.kind == "module"
    assert call.input.shape == (16, 4, 3) and call.target is batch[1][0]
    with torch.no_grad():
        assert torch.allclose(call.recompute(call.input.detach()), result.loss.detach(), rtol=1e-5)
    ref = know_nothing_loss(call)
    assert ref is not None and ref[1] in (MEAN_PREDICTOR, _losses.CONSTANT)


def test_a_custom_classification_loss_gets_a_chance_reference_and_label_free_ratio():
    torch.manual_seed(0)
    model = GraphNet()
    batch = first(graph_loaders)
    with torch.no_grad():
        call = run_step(model, batch).main_call
    assert call.name == "LabelSmoothedNLL"
    ref = _losses.know_nothing_loss(call, prefer=CHANCE)
    assert ref[1] == CHANCE and abs(float(ref[0]) - torch.log(torch.tensor(3.0))) < 1e-4
    assert float(know_nothing_loss(call)[0]) <= float(ref[0])  # the lowest reference otherwise
    ratio = _losses.label_free_ratio(call, _losses.uniform_scores(call.input, 1))
    assert 0.99 < ratio < 1.1


def test_a_distribution_likelihood_is_a_loss_call():
    model = GaussianNLL()
    batch = first(regression_loaders)
    result = run_step(model, batch)
    call = result.main_call
    assert call.name == "Normal.log_prob" and call.kind == "distribution"
    assert call.reduce == "mean" and call.sign == -1.0
    assert torch.allclose(call.output, result.loss)
    ref = know_nothing_loss(call)
    y = batch[1]
    expected = 0.5 * torch.log(2 * torch.pi * y.var()) + 0.5  # N(mean, std) of the targets
    assert ref[1] == MEAN_PREDICTOR and abs(float(ref[0]) - float(expected)) < 0.05


class CallLoss(torch.nn.Module):
    """A loss that overrides ``__call__`` (forward hooks never see it) and takes the target
    first, by keyword: ``loss(y=target, y_hat=prediction, mask=...)``, as neuralforecast's
    losses do."""

    def __call__(self, y, y_hat, mask=None):
        mask = torch.ones_like(y) if mask is None else mask
        return ((y - y_hat).abs() * mask).sum() / mask.sum()


class KeywordTargetFirst(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.loss = CallLoss()

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(y=y, y_hat=self(x), mask=torch.ones_like(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("grad", [True, False])
def test_a_loss_overriding_call_with_the_target_first_is_read(grad):
    """The prediction is where the model's own output went (or the one argument with a
    gradient), not the first argument, and not guessed from the names ``y`` / ``y_hat``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    batch = (x, x[:, 0] * 2 + 1)
    with torch.set_grad_enabled(grad):
        result = run_step(KeywordTargetFirst(), batch)
    call = result.main_call
    assert call.name == "CallLoss" and call.extra["pred_at"] == "y_hat"
    assert call.target is batch[1]
    with torch.no_grad():
        assert torch.allclose(call.recompute(call.input.detach()), result.loss.detach())
        ref = know_nothing_loss(call)
    assert ref[1] == MEAN_PREDICTOR
    expected = (batch[1] - batch[1].mean()).abs().mean()
    assert abs(float(ref[0]) - float(expected)) < 1e-5


def test_loss_computed_inside_forward_hf_style():
    batch = first(token_loaders)
    result = run_step(HFStyle(), batch)
    assert result.main_call.name == "cross_entropy"
    assert result.main_call.target is not None


def test_a_plain_loss_function_makes_the_step_the_loss_call():
    model = FunctionLoss()
    batch = first(regression_loaders)
    result = run_step(model, batch)
    call = result.main_call
    assert call.kind == "step" and call.name == "training_step" and call.target is batch[1]
    with torch.no_grad():
        assert torch.allclose(call.recompute(call.input.detach()), result.loss.detach())
        ref = know_nothing_loss(call)
    assert ref[1] == MEAN_PREDICTOR


def test_a_plain_model_is_read_as_before():
    from models import Classifier, blobs, mlp

    x, y = blobs()
    result = run_step(Classifier(mlp()), (x[:16], y[:16]))
    assert result.main_call.name == "cross_entropy" and result.module_calls == []


# ---------------------------------------------------------------------------- the full suite
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_the_full_suite_measures_on_healthy_third_party_patterns(tmp_path, pattern):
    L.seed_everything(0, verbose=False)
    make, loaders = PATTERNS[pattern]
    run = fit_suite(tmp_path, make(), *loaders())
    assert run.internal_errors() == []
    assert run.loud() == []
    skipped = {f.source for f in run.findings if f.code == "check-skipped"}
    assert skipped <= {"FirstLayerFilterMonitor"}, [
        f.message for f in run.findings if f.code == "check-skipped"
    ]
    for check, figure in CHECK_FIGURES.items():
        assert figure in run.by_name(check).figures, (check, run.by_name(check).figures)
    assert "gap" in run.by_name("InputIndependentBaseline").figures
    # the ride-along monitors and the penalty check read these losses too
    assert "grad_ratio" in run.by_name("RegularizationCheck").figures
    label_noise = run.by_name("LabelNoiseMonitor").figures
    if pattern in ("graph", "hf"):  # classifiers through a custom loss module / a loss in forward
        assert label_noise["captured_steps"] > 0 and "not_applicable" not in label_noise, label_noise
    else:
        assert "classification" in label_noise["not_applicable"]
    if pattern not in ("distribution", "function"):  # their validation loss is read by no call
        assert "gap" in run.by_name("BaselineMonitor").figures
    if pattern != "hf":
        loss_at_init = run.by_name("LossAtInitCheck").figures
        assert "reference" in loss_at_init or "mean_predictor_loss" in loss_at_init


@pytest.mark.parametrize(
    "pattern, kwargs, code",
    [
        ("graph", {"mix_graphs": True}, "batch-mixing"),
        ("function", {"detach": True}, "params-not-updating"),
        ("chemistry", {"lr_scale": 1e-4}, "update-ratio-low"),
        ("graph", {"head_scale": 30.0}, "loss-at-init"),
        ("forecasting", {"detach": True}, "params-not-updating"),
        ("distribution", {"lr": 1e-7}, "update-ratio-low"),
        ("hf", {"softmax_twice": True}, "softmax-before-loss"),
    ],
)
def test_planted_bugs_are_still_caught(tmp_path, pattern, kwargs, code):
    L.seed_everything(0, verbose=False)
    make, loaders = PATTERNS[pattern]
    run = fit_suite(tmp_path, make(**kwargs), *loaders())
    assert run.internal_errors() == []
    assert code in {c for _, c in run.codes("warning", "error")}, run.loud()


# ---------------------------------------------------------------------------- more containers
def test_chemistry_style_namedtuple_of_an_initvar_dataclass_graph():
    """chemprop's layout: a namedtuple (bmg, V_d, X_d, Y, w) whose first field is a frozen
    dataclass with an ``InitVar`` holding atom features V, bond features E, an edge index, the
    reverse-edge index and the assignment vector."""
    sizes = [3, 5, 4, 6]
    batch = TrainingBatch(MolGraphBatch(sizes), None, torch.randn(4, 2), torch.randn(4, 1), torch.ones(4, 1))
    a = BatchAdapter()
    assert a.input(batch) is batch.bmg.V and a.target(batch) is batch.Y
    assert a.batch_size(batch) == 4
    cut = a.slice(batch, 2)
    assert type(cut) is TrainingBatch and type(cut.bmg) is MolGraphBatch
    assert cut.bmg.V.shape[0] == 8 and cut.bmg.E.shape[0] == 16 and cut.bmg.edge_index.shape == (2, 16)
    assert cut.bmg.rev_edge_index.shape == (16,) and int(cut.bmg.rev_edge_index.max()) < 16
    assert cut.Y.shape == (2, 1) and cut.X_d.shape == (2, 2) and cut.V_d is None
    zero = a.zero_inputs(batch)
    assert float(zero.bmg.V.abs().sum()) == 0 and zero.bmg.edge_index is batch.bmg.edge_index


def test_userdict_batches_keep_their_type():
    from collections import UserDict

    class Encoding(UserDict):
        def to(self, device):
            return Encoding({k: v.to(device) for k, v in self.items()})

    batch = Encoding({"input_ids": torch.randint(0, 9, (4, 5)), "labels": torch.arange(4)})
    a = BatchAdapter()
    assert a.input(batch) is batch["input_ids"] and a.target(batch) is batch["labels"]
    assert type(a.slice(batch, 2)) is Encoding and a.slice(batch, 2)["input_ids"].shape == (2, 5)


class LogNormalNLL(L.LightningModule):
    """A likelihood whose mean is no parameter: a log-normal's mean is exp(loc + scale**2 / 2)
    (a zero-inflated count model's is mu * (1 - pi))."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        scale = torch.nn.functional.softplus(out[:, 1]) + 0.1
        return -torch.distributions.LogNormal(out[:, 0], scale).log_prob(y).mean()


def test_a_distribution_whose_mean_is_no_parameter_takes_a_new_mean():
    """Averaged or constant predictions (ensembles, baselines) replace a distribution's mean: the
    parameter that moves it is found and checked, never an internal error."""
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 4, generator=g), torch.rand(16, generator=g) + 0.5)
    result = run_step(LogNormalNLL(), batch)
    call = result.main_call
    assert call.kind == "distribution" and call.name == "LogNormal.log_prob"
    with torch.no_grad():
        assert torch.allclose(call.recompute(call.input.detach()), result.loss.detach())
        mean = torch.full_like(call.input, float(call.input.mean()))
        assert torch.allclose(call._with_mean(mean).mean, mean, rtol=1e-4)
        assert torch.isfinite(call.recompute(mean))
        ref = know_nothing_loss(call)
    assert ref is not None and bool(torch.isfinite(ref[0]))


def test_nested_captures_each_see_module_and_distribution_losses():
    """Two monitors capturing the same real step (ride-along captures nest): both read the
    distribution likelihood and the loss module that overrides ``__call__``."""
    from lightning_recipe._probe import LossCapture

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 4, generator=g), torch.rand(16, generator=g) + 0.5)
    model = LogNormalNLL()
    with LossCapture(model) as outer, LossCapture(model) as inner:
        loss = model.training_step(batch, 0)
    for cap in (outer, inner):
        assert [c.name for c in cap.result(loss).module_calls] == ["LogNormal.log_prob"]
    x = torch.randn(32, 8, generator=g)
    model = KeywordTargetFirst()
    with LossCapture(model) as outer, LossCapture(model) as inner:
        loss = model.training_step((x, x[:, 0]), 0)
    for cap in (outer, inner):
        assert [c.name for c in cap.result(loss).module_calls] == ["CallLoss"]


def test_a_ride_along_capture_keeps_no_graph_after_it_stops():
    """The forward output a capture keeps is detached: the capture lives on a callback the module
    reaches through its trainer, and a probe's deep copy of the module must not meet a graph."""
    from lightning_recipe.monitors._ride_along import StepCapture

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    model = KeywordTargetFirst()
    cap = StepCapture()
    assert cap.start(model)
    loss = model.training_step((x, x[:, 0]), 0)
    result = cap.stop(loss)
    assert result is not None and result.main_call.name == "CallLoss"
    assert cap.forward_output is not None and cap.forward_output.grad_fn is None
