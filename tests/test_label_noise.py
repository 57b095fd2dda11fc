"""LabelNoiseMonitor: a left/right flip that keeps the labels is flagged; healthy traps stay quiet."""

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_recipe as lr
from lightning_recipe.monitors.label_noise import TAG, LabelNoiseMonitor, pair_statistics
from lightning_recipe.monitors.prediction_dynamics import PredictionDynamicsMonitor
from models import Classifier, accumulator, blobs, cnn, mlp, trainer

LEFT, RIGHT = 0, 1


def arrows(n: int = 1024, size: int = 12, seed: int = 0):
    """Noisy 12x12 images of 6 classes: arrows pointing left, right, up, down (0-3), a cross
    and a ring (4, 5: symmetric under a horizontal flip), at random positions and sizes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 6, (n,), generator=g)
    r = torch.arange(size).float()
    rr, cc = torch.meshgrid(r, r, indexing="ij")
    centre = size / 2 - 0.5 + 0.8 * torch.randn(n, 2, generator=g)
    h = (3.0 + 1.5 * torch.rand(n, generator=g)).view(n, 1, 1)
    dy, dx = rr - centre[:, 0].view(n, 1, 1), cc - centre[:, 1].view(n, 1, 1)
    shapes = torch.stack(
        [
            (dx.abs() <= h) & (dy.abs() <= (dx + h) / 2),  # tip on the left
            (dx.abs() <= h) & (dy.abs() <= (h - dx) / 2),  # tip on the right
            (dy.abs() <= h) & (dx.abs() <= (dy + h) / 2),
            (dy.abs() <= h) & (dx.abs() <= (h - dy) / 2),
            ((dx.abs() <= 0.8) | (dy.abs() <= 0.8)) & (dx.abs() <= h) & (dy.abs() <= h),
            ((dx**2 + dy**2).sqrt() - h).abs() <= 0.9,
        ],
        1,
    ).float()
    x = shapes[torch.arange(n), y].unsqueeze(1) + 0.3 * torch.randn(n, 1, size, size, generator=g)
    return x, y


class Flipped(Dataset):
    """Flips each image left-right with probability 1/2; ``swap`` relabels left <-> right (the
    correct augmentation), ``keep`` keeps the label (the bug). Dict batches carry the index."""

    def __init__(self, x, y, labels="keep", as_dict=False):
        self.x, self.y, self.labels, self.as_dict = x, y, labels, as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x, y = self.x[i], self.y[i]
        if self.labels != "none" and torch.rand(()) < 0.5:
            x = x.flip(-1)
            if self.labels == "swap" and int(y) in (LEFT, RIGHT):
                y = 1 - y
        return {"x": x, "y": y, "index": i} if self.as_dict else (x, y)


def arrow_mlp():
    return nn.Sequential(nn.Flatten(), mlp(144, 6, hidden=64))


def fit(tmp_path, model, train_ds, val_ds, callbacks, epochs=10, logger=None, seed=0, keys=None):
    L.seed_everything(seed, verbose=False)
    train = DataLoader(train_ds, batch_size=32, shuffle=True)
    val = DataLoader(val_ds, batch_size=64)
    t = trainer(tmp_path, callbacks, logger=logger, max_epochs=epochs, log_every_n_steps=10)
    t.fit(model, train, val)
    return t


def arrow_run(tmp_path, labels, net="mlp", as_dict=False, logger=None, seed=0):
    x, y = arrows(seed=seed)
    keys = ("x", "y") if as_dict else None
    model = Classifier(arrow_mlp() if net == "mlp" else cnn(classes=6), lr=3e-3)
    mon = LabelNoiseMonitor()
    train, val = Flipped(x[256:], y[256:], labels, as_dict), Flipped(x[:256], y[:256], "none", as_dict)
    t = fit(tmp_path, model, train, val, [mon], logger=logger, seed=seed, keys=keys)
    return mon, t


def codes(mon, severity=None):
    return [f.code for f in mon.findings if severity is None or f.severity.value == severity]


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_a_flip_that_keeps_left_right_labels_is_flagged(tmp_path, net):
    with pytest.warns(lr.RecipeWarning, match=r"\[label-noise\]"):
        mon, _ = arrow_run(tmp_path, "keep", net=net)
    assert codes(mon) == ["label-noise"]
    f = mon.findings[0]
    assert f.severity.value == "warning"
    assert sorted(f.evidence["pair"]) == [LEFT, RIGHT]
    assert f.evidence["pair_confusion"] > 0.4  # a coin flip for the net: 0.5
    examples = f.evidence["examples"]
    assert examples and all({e["label"], e["seen_as"]} == {LEFT, RIGHT} for e in examples)
    assert {"step", "batch_idx", "position"} <= set(examples[0])
    assert "classes 0 and 1" in f.message


def test_examples_carry_dataset_indices_and_the_grid_reaches_tensorboard(tmp_path):
    _, y = arrows()
    mon, t = arrow_run(tmp_path, "keep", as_dict=True, logger="tb")
    assert codes(mon) == ["label-noise"]
    examples = mon.findings[0].evidence["examples"]
    flipped_left_right = 0
    for e in examples:  # the dataset index points at a left/right arrow of the other label
        assert int(y[256 + e["index"]]) == e["label"]
        flipped_left_right += int(e["label"] in (LEFT, RIGHT))
    assert flipped_left_right == len(examples)
    assert TAG in accumulator(t.logger.log_dir).Tags()["images"]


@pytest.mark.parametrize("labels", ["swap", "none"])
def test_a_flip_that_swaps_the_labels_and_no_flip_are_quiet(tmp_path, labels):
    mon, _ = arrow_run(tmp_path, labels)
    assert codes(mon) == []
    assert mon.figures["pair_confusion"] < 0.15
    assert mon.figures["captured_steps"] >= 20


def test_digits_and_noisy_but_learnable_data_are_quiet(tmp_path):
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    mon = LabelNoiseMonitor()
    model = Classifier(nn.Sequential(nn.Flatten(), mlp(64, 10, hidden=64)), lr=3e-3)
    fit(tmp_path, model, TensorDataset(x[400:], y[400:]), TensorDataset(x[:400], y[:400]), [mon], epochs=6)
    assert codes(mon) == [] and mon.figures["pair_confusion"] < 0.15
    # 45% of the labels of a 3-class task redrawn at random: noisy, but not a pair's noise
    xb, yb = blobs(n=1024, classes=3)
    noisy = yb.clone()
    redraw = torch.rand(len(yb)) < 0.45
    noisy[redraw] = torch.randint(0, 3, (int(redraw.sum()),))
    mon = LabelNoiseMonitor()
    fit(
        tmp_path,
        Classifier(mlp(16, 3)),
        TensorDataset(xb[256:], noisy[256:]),
        TensorDataset(xb[:256], yb[:256]),
        [mon],
    )
    assert codes(mon) == []
    assert mon.figures["pair_excess"] < 0.25


def test_regression_is_not_applicable_and_says_why(tmp_path):
    x, _ = blobs(n=256)
    y = x[:, :2].sum(1, keepdim=True)
    mon = LabelNoiseMonitor(min_steps=0, late_fraction=0.0)
    fit(
        tmp_path,
        Classifier(mlp(16, 1), loss="mse"),
        TensorDataset(x, y),
        TensorDataset(x, y),
        [mon],
        epochs=1,
    )
    assert codes(mon) == []  # nothing to judge is not a blind check
    assert "classification" in mon.figures["not_applicable"]


class TokenTagger(L.LightningModule):
    """Per-token classes over sequences: the loss scores B * T rows for B samples."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(12, 16), nn.Linear(16, 12)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.out(self.emb(x)).transpose(1, 2), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_sequence_models_are_not_applicable_and_say_why(tmp_path):
    x = torch.randint(0, 12, (256, 8))
    mon = LabelNoiseMonitor(min_steps=0, late_fraction=0.0)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [mon], logger=None, max_epochs=1)
    t.fit(TokenTagger(), DataLoader(TensorDataset(x, (x + 1) % 12), batch_size=32))
    assert codes(mon) == []
    assert "sequence or token model" in mon.figures["not_applicable"]


def test_the_real_run_is_bit_identical(tmp_path):
    x, y = arrows(n=256)
    states = []
    for callbacks in ([], [LabelNoiseMonitor(every_n_steps=1, late_fraction=0.0)]):
        torch.manual_seed(0)
        model = Classifier(arrow_mlp(), lr=3e-3)
        fit(tmp_path, model, Flipped(x, y, "keep"), Flipped(x[:64], y[:64], "none"), callbacks, epochs=2)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch._C._len_torch_function_stack() == 0  # no mode left behind


def test_two_captures_on_one_step_both_end_before_the_backward_pass(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from lightning_recipe.monitors.baselines import BaselineMonitor

    depths = []

    class Depth(Callback):
        def on_before_optimizer_step(self, *args):
            depths.append(torch._C._len_torch_function_stack())

    x, y = arrows(n=256)
    noise = LabelNoiseMonitor(every_n_steps=1, late_fraction=0.0, min_samples=1)
    base = BaselineMonitor(every_n_steps=1)
    model = Classifier(arrow_mlp(), lr=3e-3)
    fit(
        tmp_path,
        model,
        Flipped(x, y, "none"),
        Flipped(x[:64], y[:64], "none"),
        [noise, base, Depth()],
        epochs=1,
    )
    assert depths and set(depths) == {0}  # backward and optimizer step ran outside both modes
    assert noise.figures["captured_steps"] == len(depths) and "gap" in base.figures


def test_pair_statistics_on_hand_made_matrices():
    counts = torch.full((4,), 100.0)
    # classes 0 and 1 are a coin flip for the net, 2 and 3 are learned
    m = torch.tensor([[0.5, 0.45, 0.03, 0.02], [0.45, 0.5, 0.02, 0.03], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    s = pair_statistics(m * 100, counts, 20)
    assert s["pair"] == [0, 1] and s["pair_confusion"] == pytest.approx(0.45 / 0.95 * 0.95 / 0.95, rel=0.1)
    assert s["pair_excess"] > 0.8
    # the same errors spread over every class: no pair stands out
    u = torch.full((4, 4), 0.1) + torch.eye(4) * 0.6
    s = pair_statistics(u * 100, counts, 20)
    assert abs(s["pair_excess"]) < 1e-6
    assert pair_statistics(m * 100, torch.tensor([100.0, 5, 5, 5]), 20) is None


def test_prediction_instability_confined_to_a_pair_does_not_blame_the_learning_rate():
    mon = PredictionDynamicsMonitor(num_examples=20)
    mon._values.append([0.5] * 20)
    mon._classes_seen = {0, 1, 2, 3, 4, 5}
    for step in range(5):
        mon._flips.append((100 + step, 0.3))
        mon._flip_pairs.append([(0.0, 1.0)] * 5 + [(2.0, 4.0)])
    mon.figures["accuracy"] = 0.8
    mon._report_instability(None)
    f = mon.findings[0]
    assert f.code == "prediction-instability" and f.severity.value == "info"
    assert "learning rate too high" in f.message and "lower it" not in f.message
    assert "label-noise" in f.message and f.evidence["pair"] == [0, 1]
    # flips spread over many classes keep the learning-rate warning
    mon = PredictionDynamicsMonitor(num_examples=20)
    mon._values.append([0.5] * 20)
    mon._classes_seen = {0, 1, 2, 3}
    for step in range(5):
        mon._flips.append((100 + step, 0.3))
        mon._flip_pairs.append([(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (0.0, 3.0), (0.0, 2.0), (1.0, 3.0)])
    mon.figures["accuracy"] = 0.5
    with pytest.warns(lr.RecipeWarning, match="learning rate is probably too high"):
        mon._report_instability(None)
    assert mon.findings[0].severity.value == "warning"


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="every_n_steps"):
        LabelNoiseMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="min_pair_confusion"):
        LabelNoiseMonitor(min_pair_confusion=0)
    with pytest.raises(ValueError, match="late_fraction"):
        LabelNoiseMonitor(late_fraction=1.0)


def test_a_pair_still_being_learned_in_a_short_run_is_no_warning(tmp_path):
    # a healthy CNN 18 steps into training: classes 2 and 3 of these blobs are the closest and still
    # 34% confused at steps 10 and 15 (the broken flip: 0.42-0.50 over 20+ captured steps); two
    # snapshots cannot tell a pair being learned from one that stays split
    from models import image_blobs, loaders

    L.seed_everything(0, verbose=False)
    x, y = image_blobs(n=512)
    train, val = loaders(x, y, batch_size=64)
    mon = LabelNoiseMonitor()
    trainer(tmp_path, [mon], max_epochs=3, log_every_n_steps=2).fit(Classifier(cnn()), train, val)
    assert codes(mon) == []
    assert mon.figures["captured_steps"] == 2 and mon.figures["pair_confusion"] >= 0.3
    assert "too early to tell" in mon.figures["note"]
