"""InputIndependentBaseline: real inputs must beat zeroed inputs; shuffled labels and blind models fail."""

import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_recipe as lr
import lightning_recipe.monitors.input_independent as ii_module
from lightning_recipe.monitors.input_independent import InputIndependentBaseline
from models import (
    Classifier,
    GRUNet,
    ManualClassifier,
    TinyTransformer,
    accumulator,
    blobs,
    cnn,
    image_blobs,
    loaders,
    mlp,
    token_blobs,
    trainer,
)

TAG = "recipe/input_independent"


def fit(tmp_path, model, x, y, monitor, *, logger=None, epochs=5, dict_keys=None, ckpt_path=None, **kw):
    train, val = loaders(x, y, dict_keys=dict_keys)  # 64 validation examples: 2 batches of 32
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [monitor], logger=logger, max_epochs=epochs, **kw)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return t


def codes(monitor, severity=None):
    return [f.code for f in monitor.findings if severity is None or f.severity.value == severity]


def shuffled_blobs(n=256):
    x, y = blobs(n=n)
    g = torch.Generator().manual_seed(7)
    return x, y[torch.randperm(len(y), generator=g)]  # train and val labels unrelated to inputs


class Blind(nn.Module):
    """A model whose forward ignores its input."""

    def __init__(self, classes=4):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(classes))
        self.unused = nn.Linear(16, classes)

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1)


def test_labels_shuffled_apart_from_inputs_are_an_error(tmp_path):
    mon = InputIndependentBaseline()
    with pytest.warns(lr.RecipeWarning, match=r"\[input-independent\]"):
        t = fit(tmp_path, Classifier(mlp()), *shuffled_blobs(), mon)
    assert codes(mon) == ["input-independent"]
    f = mon.findings[0]
    assert f.severity is lr.Severity.ERROR
    assert f.step == 4 * 6  # the 4th validation run: 2 warm-up runs, then 2 without a clear gap
    assert all(g < mon.min_gap for g in f.evidence["gaps"]) and len(f.evidence["gaps"]) == 2
    assert f.evidence["chance_loss"] == pytest.approx(math.log(4), rel=1e-5)
    assert f"{f.evidence['real_loss']:.4g}" in f.message and f"{f.evidence['zero_loss']:.4g}" in f.message
    assert t.global_step == 30  # reported, never stopped


def test_a_model_that_ignores_its_input_is_an_error(tmp_path):
    mon = InputIndependentBaseline()
    with pytest.warns(lr.RecipeWarning, match=r"\[input-independent\]"):
        fit(tmp_path, Classifier(Blind()), *blobs(n=256), mon)
    assert codes(mon) == ["input-independent"]
    assert all(g <= 0 for g in mon.findings[0].evidence["gaps"])  # never better than the baseline
    assert mon.figures["real_loss"] == mon.figures["zero_loss"]


def test_on_error_raise_stops_the_fit(tmp_path):
    mon = InputIndependentBaseline(on_error="raise", warmup=1, patience=1)
    with pytest.raises(lr.RecipeError, match=r"\[input-independent\]"), pytest.warns(lr.RecipeWarning):
        fit(tmp_path, Classifier(Blind()), *blobs(n=256), mon)
    assert mon._runs == 2


class Regressor(Classifier):
    def __init__(self):
        super().__init__(mlp(classes=1), loss="mse")

    def forward(self, x):
        return self.net(x).squeeze(-1)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "gru", "transformer", "dict", "regression"])
def test_healthy_models_are_silent(tmp_path, kind):
    dict_keys = None
    if kind == "cnn":
        (x, y), model = image_blobs(n=256), Classifier(cnn())
    elif kind == "gru":  # zeroed token ids are id 0: padding, still a valid baseline
        (x, y), model = token_blobs(n=256), Classifier(GRUNet())
    elif kind == "transformer":
        (x, y), model = token_blobs(n=256), Classifier(TinyTransformer(), lr=3e-3)
    elif kind == "dict":
        (x, y), model = blobs(n=256), Classifier(mlp(), x_key="features", y_key="label")
        dict_keys = ("features", "label")
    elif kind == "regression":
        x, _ = blobs(n=256)
        y, model = x[:, 0] * 2.0 - x[:, 1], Regressor()
    else:
        (x, y), model = blobs(n=256), Classifier(mlp())
    mon = InputIndependentBaseline()
    fit(tmp_path, model, x, y, mon, dict_keys=dict_keys)
    assert codes(mon) == []
    assert len(mon._history) == 5 and mon._runs > mon.warmup + mon.patience  # it really judged
    assert mon.figures["gap"] > 0.3


class NeedsItsInput(nn.Module):
    """A model that cannot run without its input (a forecasting model windowing a series by the
    mask it carries raises "no windows available" on an all-zero batch)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if not bool(x.abs().sum(dim=1).gt(0).any()):
            raise ValueError("No windows available for training")
        return self.net(x)


@pytest.mark.parametrize("labels", ["real", "shuffled"])
def test_a_model_that_cannot_run_on_zeros_is_judged_against_the_know_nothing_loss(tmp_path, labels):
    x, y = blobs(n=256) if labels == "real" else shuffled_blobs()
    mon = InputIndependentBaseline()
    fit(tmp_path, Classifier(NeedsItsInput(mlp())), x, y, mon)
    assert "know-nothing loss" in mon.figures["zeroed"] and "No windows" in mon.figures["zeroed"]
    assert mon.figures["zero_loss"] == pytest.approx(math.log(4), rel=1e-5)
    if labels == "real":
        assert codes(mon) == [] and mon.figures["gap"] > 0.3
    else:  # the broken case still fires
        assert codes(mon) == ["input-independent"]


class WindowForecaster(L.LightningModule):
    """Forecasts the last value of a series from a window it cuts out of the series (a copy, as
    forecasting libraries build windows): the target comes from the input, and no layer reads
    the input tensor itself. ``blind`` ignores the window."""

    def __init__(self, blind=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(15, 32), nn.ReLU(), nn.Linear(32, 1))
        self.blind = blind

    def _loss(self, batch):
        (series,) = batch
        window, target = series[:, :-1].clone(), series[:, -1]
        out = self.net(window * 0 if self.blind else window).squeeze(-1)
        return F.mse_loss(out, target)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("blind", [False, True])
def test_targets_cut_from_the_input_with_no_reader_use_the_know_nothing_loss(tmp_path, blind):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16.0)
    series = torch.sin(0.4 * t + 6.28 * torch.rand(320, 1, generator=g)) + 0.05 * torch.randn(
        320, 16, generator=g
    )
    train = DataLoader(TensorDataset(series[:256]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(series[256:]), batch_size=32)
    mon = InputIndependentBaseline()
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [mon], logger=None, max_epochs=5).fit(WindowForecaster(blind), train, val)
    assert "know-nothing loss" in mon.figures["zeroed"], mon.findings
    if blind:
        assert codes(mon) == ["input-independent"]
    else:
        assert codes(mon) == [] and mon.figures["gap"] > 0.3


def test_tensorboard_holds_the_measured_losses_and_the_chart(tmp_path):
    x, y = blobs(n=256)
    model = Classifier(mlp())
    mon = InputIndependentBaseline()
    t = fit(tmp_path, model, x, y, mon, logger="tb", epochs=2)
    acc = accumulator(t.logger.log_dir)
    scalars = acc.Tags()["scalars"]
    for name in ("real_loss", "zero_loss", "chance_loss", "gap"):
        assert f"{TAG}/{name}" in scalars, name
        assert len(acc.Scalars(f"{TAG}/{name}")) == 2  # two validation runs, the sanity check excluded
    model.eval()
    with torch.no_grad():
        real = (F.cross_entropy(model(x[:32]), y[:32]) + F.cross_entropy(model(x[32:64]), y[32:64])) / 2
        zeros = torch.zeros(32, 16)
        zero = (F.cross_entropy(model(zeros), y[:32]) + F.cross_entropy(model(zeros), y[32:64])) / 2
    assert acc.Scalars(f"{TAG}/real_loss")[-1].value == pytest.approx(float(real), rel=1e-5)
    assert acc.Scalars(f"{TAG}/zero_loss")[-1].value == pytest.approx(float(zero), rel=1e-5)
    assert acc.Scalars(f"{TAG}/chance_loss")[-1].value == pytest.approx(math.log(4), rel=1e-5)
    gap = (min(float(zero), math.log(4)) - float(real)) / min(float(zero), math.log(4))
    assert acc.Scalars(f"{TAG}/gap")[-1].value == pytest.approx(gap, rel=1e-4)

    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["real vs zero-input loss"] == [rf"{TAG}/(real|zero|chance)_loss"]


class StashSpy(L.Callback):
    """Records the monitor's kept batches after each validation run (they are freed at train end)."""

    def __init__(self, monitor):
        self.monitor, self.seen = monitor, []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.seen = list(self.monitor._stash.batches)


def test_kept_batches_are_cut_to_256_examples_and_distinct(tmp_path):
    x, y = blobs(n=1200)
    train, _ = loaders(x, y)
    val = DataLoader(TensorDataset(x[:600], y[:600]), batch_size=300)
    mon = InputIndependentBaseline()
    spy = StashSpy(mon)
    L.seed_everything(0, verbose=False)
    t = trainer(
        tmp_path, [mon, spy], logger=None, limit_train_batches=2, num_sanity_val_steps=1, max_epochs=2
    )
    t.fit(Classifier(mlp()), train, val)
    # the sanity check saw batch 0 only; batch 1 came from the first validation, without duplicates
    assert [b[0].shape[0] for b in spy.seen] == [256, 256]
    assert torch.equal(spy.seen[0][0], x[:256]) and torch.equal(spy.seen[1][0], x[300:556])
    assert len(mon._history) == 2


def test_batches_come_from_the_first_validation_without_a_sanity_check(tmp_path):
    mon = InputIndependentBaseline(num_batches=1)
    spy = StashSpy(mon)
    train, val = loaders(*blobs(n=256))
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [mon, spy], logger=None, max_epochs=2, num_sanity_val_steps=0).fit(
        Classifier(mlp()), train, val
    )
    assert len(mon._history) == 2 and len(spy.seen) == 1
    assert spy.seen[0][0].shape == (32, 16)


def test_kept_batches_are_freed_when_training_ends(tmp_path):
    """Up to 2 x 256 validation examples live on the device during the fit; after it they would only
    hold accelerator memory the user needs for testing or the next model."""
    mon = InputIndependentBaseline()
    fit(tmp_path, Classifier(mlp()), *blobs(n=256), mon, epochs=2)
    assert len(mon._history) == 2
    assert mon._stash.batches == []


class CountingDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def fit_for_identity(tmp_path, callbacks):
    L.seed_everything(123, verbose=False)
    x, y = image_blobs(n=256)
    train_set, val_set = CountingDataset(x[64:], y[64:]), CountingDataset(x[:64], y[:64])
    model = Classifier(cnn())  # BatchNorm and dropout
    t = trainer(tmp_path, callbacks, logger="csv", max_epochs=3)
    t.fit(model, DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, batch_size=32))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        rows = [{k: v for k, v in r.items() if not k.startswith("recipe/")} for r in csv.DictReader(fh)]
    rows = [r for r in rows if any(v for k, v in r.items() if k not in ("epoch", "step"))]
    return model.state_dict(), rows, torch.get_rng_state(), (train_set.reads, val_set.reads)


def test_the_run_is_bit_identical_and_no_dataloader_is_iterated(tmp_path):
    w0, m0, r0, reads0 = fit_for_identity(tmp_path / "plain", [])
    mon = InputIndependentBaseline()
    w1, m1, r1, reads1 = fit_for_identity(tmp_path / "monitor", [mon])
    assert len(mon._history) == 3
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert m0 == m1
    assert torch.equal(r0, r1)
    assert reads0 == reads1


def test_it_works_only_after_validation_runs(tmp_path, monkeypatch):
    calls = []
    original = ii_module.copy_module
    monkeypatch.setattr(ii_module, "copy_module", lambda *a, **k: calls.append(1) or original(*a, **k))
    mon = InputIndependentBaseline()
    fit(tmp_path, Classifier(mlp()), *blobs(n=256), mon, epochs=3)
    assert len(calls) == 3  # one copy per validation run (not per step, not in the sanity check)


def test_resume_keeps_the_warm_up_and_the_streak(tmp_path):
    x, y = shuffled_blobs()
    first = InputIndependentBaseline()
    t = fit(tmp_path, Classifier(mlp()), x, y, first, epochs=3)
    assert first._runs == 3 and first._streak == 1 and codes(first) == []
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)
    second = InputIndependentBaseline()
    with pytest.warns(lr.RecipeWarning, match=r"\[input-independent\]"):
        fit(tmp_path, Classifier(mlp()), x, y, second, epochs=4, ckpt_path=str(ckpt))
    # without the saved state the resumed run would be in its warm-up again
    assert second._runs == 4 and codes(second) == ["input-independent"]
    assert [r["step"] for r in second._history] == [6.0, 12.0, 18.0, 24.0]


def test_state_dict_round_trip():
    mon = InputIndependentBaseline()
    mon._runs, mon._streak = 7, 1
    mon._history.extend({"step": float(i), "real_loss": 1.0, "zero_loss": 2.0, "gap": 0.5} for i in range(3))
    state = mon.state_dict()
    other = InputIndependentBaseline()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_no_validation_data_is_an_info_skip(tmp_path):
    x, y = blobs(n=128)
    train, _ = loaders(x, y)
    mon = InputIndependentBaseline()
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [mon], logger=None, max_steps=3).fit(Classifier(mlp()), train)
    assert codes(mon) == ["check-skipped"] and "validation" in mon.findings[0].message


def test_manual_optimisation_needs_step_fn(tmp_path):
    mon = InputIndependentBaseline()
    fit(tmp_path / "a", ManualClassifier(mlp()), *blobs(n=128), mon, epochs=1)
    assert codes(mon) == ["check-skipped"] and "step_fn" in mon.findings[0].message
    step_fn = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    mon = InputIndependentBaseline(step_fn=step_fn)
    fit(tmp_path / "b", ManualClassifier(mlp()), *blobs(n=128), mon, epochs=1)
    assert codes(mon) == [] and mon.figures["gap"] > 0


def test_a_dict_with_unknown_keys_is_read_by_structure(tmp_path):
    """No key names the input: the float tensor that is not the target is the input (before,
    the batch was unreadable and the monitor skipped)."""
    x, y = blobs(n=128)
    model = Classifier(mlp(), x_key="pixels", y_key="digit")
    mon = InputIndependentBaseline()
    fit(tmp_path / "a", model, x, y, mon, epochs=1, dict_keys=("pixels", "digit"))
    assert codes(mon) == [] and len(mon._history) == 1
    mon = InputIndependentBaseline(get_input=lambda b: b["pixels"])
    fit(tmp_path / "b", model, x, y, mon, epochs=1, dict_keys=("pixels", "digit"))
    assert codes(mon) == [] and len(mon._history) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_batches": 0}, "num_batches"),
        ({"num_batches": 1.5}, "num_batches"),
        ({"min_gap": 1.0}, "min_gap"),
        ({"min_gap": -0.1}, "min_gap"),
        ({"min_gap": float("nan")}, "min_gap"),
        ({"warmup": -1}, "warmup"),
        ({"patience": 0}, "patience"),
        ({"patience": True}, "patience"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InputIndependentBaseline(**kwargs)
    with pytest.raises(TypeError, match="step_fn"):
        InputIndependentBaseline(step_fn="loss")
    with pytest.raises(TypeError, match="get_target"):
        InputIndependentBaseline(get_target=1)


# ---------------------------------------------------------------------------- targets made from the input
class AutoEncoder(L.LightningModule):
    """Reconstructs its input: the target is the input itself (a batch of ``(x,)``)."""

    def __init__(self, manual_loss=False):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        self.dec = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 16))
        self.manual_loss = manual_loss

    def training_step(self, batch, batch_idx):
        x = batch[0]
        out = self.dec(self.enc(x))
        return ((out - x) ** 2).mean() if self.manual_loss else F.mse_loss(out, x)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class NextToken(L.LightningModule):
    """A language model: the targets are the input ids shifted by one (a batch of ``{"input_ids"}``)."""

    def __init__(self, vocab=20):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(vocab, 16), nn.GRU(16, 32, batch_first=True)
        self.out = nn.Linear(32, vocab)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        hidden, _ = self.rnn(self.emb(ids[:, :-1]))
        return F.cross_entropy(self.out(hidden).transpose(1, 2), ids[:, 1:])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Ids(Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def counting_sequences(n=256, length=12, vocab=20):
    """Arithmetic progressions mod ``vocab - 1`` padded with id 0: easy to predict from the prefix."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(1, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(length)) % (vocab - 1) + 1
    keep = torch.arange(length) < torch.randint(6, length, (n, 1), generator=g)
    return torch.where(keep, ids, torch.zeros_like(ids))


def targets_from_input_fit(tmp_path, kind, model=None):
    L.seed_everything(0, verbose=False)
    if kind == "next-token":
        ids = counting_sequences()
        train = DataLoader(Ids(ids[64:]), batch_size=32, shuffle=True)
        val, model = DataLoader(Ids(ids[:64]), batch_size=32), model or NextToken()
    else:
        x = blobs(n=256)[0][:, :4] @ torch.randn(4, 16) * 0.5  # low-rank: the AE can learn it
        train = DataLoader(TensorDataset(x[64:]), batch_size=32, shuffle=True)
        val = DataLoader(TensorDataset(x[:64]), batch_size=32)
        model = model or AutoEncoder(kind.endswith("loss"))
    mon = InputIndependentBaseline()
    trainer(tmp_path, [mon], logger=None, max_epochs=5).fit(model, train, val)
    return mon


@pytest.mark.parametrize("kind", ["autoencoder", "autoencoder-manual-loss", "next-token"])
def test_targets_computed_from_the_input_keep_them_and_zero_what_the_model_reads(tmp_path, kind):
    """Zeroing the batch of an autoencoder or a language model zeroes its targets too: predicting
    zeros from zeros is easy, so that "baseline" beat the healthy models by 10-100x (measured: AE
    0.29 real vs 0.013 zeroed, LM 0.64 vs 0.011). Instead the batch stays and what the model reads
    is zeroed (the ids the embedding gets, the float input of the first layer): healthy models
    then beat it clearly (gap 0.34-0.69 after 5 epochs) and stay quiet."""
    mon = targets_from_input_fit(tmp_path, kind)
    assert mon.findings == [], mon.findings
    assert mon.figures["zeroed"].startswith("what the model reads")
    assert ("emb" if kind == "next-token" else "enc.0") in mon.figures["zeroed"]
    assert mon.figures["gap"] > 0.2 and mon.figures["zero_loss"] > mon.figures["real_loss"]


class BlindNextToken(NextToken):
    """A language model whose forward never reads the tokens: it embeds a constant."""

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        hidden, _ = self.rnn(self.emb(torch.zeros_like(ids[:, :-1])))
        return F.cross_entropy(self.out(hidden).transpose(1, 2), ids[:, 1:])


class ConstantAutoEncoder(AutoEncoder):
    """Reads its input, then multiplies the code by 0: reconstructs from a learned constant."""

    def __init__(self):
        super().__init__()
        self.const = nn.Parameter(torch.zeros(1, 4))

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return F.mse_loss(self.dec(self.enc(x) * 0 + self.const), x)


@pytest.mark.parametrize("kind", ["next-token", "autoencoder"])
def test_a_language_model_or_autoencoder_blind_to_its_input_is_an_error(tmp_path, kind):
    model = BlindNextToken() if kind == "next-token" else ConstantAutoEncoder()
    mon = targets_from_input_fit(tmp_path, kind, model)
    assert codes(mon) == ["input-independent"], mon.findings
    assert max(abs(g) for g in mon.findings[0].evidence["gaps"]) < 0.05


class CopiedInputLM(NextToken):
    """Embeds a converted copy of the ids (int32 -> int64 makes new storage), still batch-sized."""

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"].to(torch.int32).long()
        hidden, _ = self.rnn(self.emb(ids[:, :-1]))
        return F.cross_entropy(self.out(hidden).transpose(1, 2), ids[:, 1:])


def test_ids_copied_before_the_embedding_are_still_zeroed(tmp_path):
    mon = targets_from_input_fit(tmp_path, "next-token", CopiedInputLM())
    assert mon.findings == [] and mon.figures["gap"] > 0.2, (mon.findings, mon.figures)


# ---------------------------------------------------------------------------- input found by watching
class Extras(Classifier):
    """Batches laid out (weight, x, y) or (index, x, y): the guessed input (position 0) is a
    tensor the model never reads."""

    def split(self, batch):
        return batch[1], batch[2]

    def loss_fn(self, out, y):
        return F.cross_entropy(out, y)


def extras_loaders(x, y, first):
    n = len(x)
    lead = torch.rand(n) + 0.5 if first == "weight" else torch.arange(n)
    cut = int(n * 0.75)
    train = DataLoader(TensorDataset(lead[:cut], x[:cut], y[:cut]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(lead[cut:], x[cut:], y[cut:]), batch_size=32)
    return train, val


@pytest.mark.parametrize("first", ["weight", "index"])
def test_the_input_is_found_when_the_guess_does_not_reach_the_model(tmp_path, first):
    mon = InputIndependentBaseline()
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [mon], logger=None, max_epochs=5).fit(
        Extras(mlp()), *extras_loaders(*blobs(n=256), first)
    )
    assert codes(mon) == []
    assert mon.figures["input"].startswith("tensor 1 of the batch")
    assert mon.figures["gap"] > 0.5


def test_a_blind_model_with_extra_tensors_is_still_an_error(tmp_path):
    mon = InputIndependentBaseline()
    L.seed_everything(0, verbose=False)
    with pytest.warns(lr.RecipeWarning, match=r"\[input-independent\]"):
        trainer(tmp_path, [mon], logger=None, max_epochs=5).fit(
            Extras(Blind()), *extras_loaders(*blobs(n=256), "index")
        )
    assert codes(mon) == ["input-independent"]
    assert "input" not in mon.figures  # nothing in the batch reaches the output


class Mixup(Classifier):
    """Healthy mixup: training_step mixes pairs of inputs with a random weight, validation_step
    is plain cross-entropy."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        lam = float(torch.distributions.Beta(0.4, 0.4).sample())
        perm = torch.randperm(x.shape[0])
        out = self(lam * x + (1 - lam) * x[perm])
        return lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])


def test_training_step_augmentation_does_not_make_a_healthy_model_look_blind(tmp_path):
    # measured through training_step, a mixup model's "real" loss on digits was 3.17 against 2.30
    # with zeroed inputs (the first loss call compares a mixed prediction with one of its labels)
    mon = InputIndependentBaseline()
    fit(tmp_path, Mixup(mlp()), *blobs(n=256), mon)
    assert codes(mon) == []
    assert mon._eval_step.name == "validation_step"
    assert mon.figures["gap"] > 0.5
