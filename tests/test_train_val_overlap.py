"""TrainValOverlapCheck: validation samples that are also training samples are counted; clean
splits, oversampling inside the training split and naturally repeating categorical rows are not
a warning."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import lightning_recipe as lr
from models import Classifier, blobs, cnn, image_blobs, mlp, trainer


def fit(tmp_path, model, train, val, check=None, **kw):
    check = check or lr.TrainValOverlapCheck()
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [check], logger=None, **{"max_epochs": 1, **kw}).fit(model, train, val)
    return check


def split(x, y, val_fraction=0.25, batch_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_val = int(len(x) * val_fraction)
    train = DataLoader(TensorDataset(x[n_val:], y[n_val:]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[:n_val], y[:n_val]), batch_size=batch_size)
    return train, val


def imbalanced(n=1000, d=16, pos=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < pos).long()
    x = torch.randn(n, d, generator=g) + y.float().unsqueeze(1)
    return x, y


def loud(check):
    return [f.code for f in check.findings if f.severity.value != "info"]


def test_clean_split_is_quiet(tmp_path):
    x, y = blobs(n=512)
    check = fit(tmp_path, Classifier(mlp()), *split(x, y))
    assert loud(check) == [] and check.findings == []
    assert check.figures["shared"] == 0 and check.figures["val_distinct"] == 128
    assert check.figures["train_samples"] == 384


def test_validating_on_the_training_loader_is_caught(tmp_path):
    x, y = blobs(n=512)
    train, _ = split(x, y)
    check = fit(tmp_path, Classifier(mlp()), train, DataLoader(train.dataset, batch_size=64))
    assert loud(check) == ["train-val-overlap"]
    assert check.figures["fraction"] == 1.0 and check.figures["shared"] == 384


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minority_upsampled_before_the_split_is_caught(tmp_path, seed):
    x, y = imbalanced(seed=seed)
    minority = (y == 1).nonzero().squeeze(1)
    reps = minority.repeat(18)  # about balanced after upsampling
    xu, yu = torch.cat([x, x[reps]]), torch.cat([y, y[reps]])
    check = fit(tmp_path, Classifier(mlp(classes=2)), *split(xu, yu, seed=seed))
    assert loud(check) == ["train-val-overlap"]
    f = check.findings[0]
    assert 0.3 < f.evidence["fraction"] < 0.7
    assert "Deduplicate before splitting" in f.message


def test_oversampling_inside_the_training_split_is_quiet(tmp_path):
    x, y = imbalanced()
    train, val = split(x, y)
    tx, ty = train.dataset.tensors
    minority = (ty == 1).nonzero().squeeze(1)
    reps = minority.repeat(18)
    upsampled = TensorDataset(torch.cat([tx, tx[reps]]), torch.cat([ty, ty[reps]]))
    up = DataLoader(upsampled, batch_size=32, shuffle=True)
    check = fit(tmp_path / "a", Classifier(mlp(classes=2)), up, val)
    assert check.findings == [] and check.figures["train_distinct"] < check.figures["train_samples"]
    weights = torch.where(ty == 1, 19.0, 1.0)
    sampler = WeightedRandomSampler(weights, num_samples=len(ty), generator=torch.Generator().manual_seed(0))
    sampled = DataLoader(train.dataset, batch_size=32, sampler=sampler)
    assert fit(tmp_path / "b", Classifier(mlp(classes=2)), sampled, val).findings == []


def test_images_clean_and_overlapping(tmp_path):
    x, y = image_blobs(n=384)
    check = fit(tmp_path / "a", Classifier(cnn()), *split(x, y))
    assert check.findings == []
    train, val = split(x, y)
    vx, vy = val.dataset.tensors
    tx, ty = train.dataset.tensors
    leaky = DataLoader(TensorDataset(torch.cat([vx[:50], tx]), torch.cat([vy[:50], ty])), batch_size=32)
    check = fit(tmp_path / "b", Classifier(cnn()), leaky, val)
    assert loud(check) == ["train-val-overlap"] and check.figures["shared"] == 50


def test_token_sequences(tmp_path):
    class Bag(Classifier):
        def forward(self, tokens):
            return self.net(self.emb(tokens).mean(1))

    def model():
        m = Bag(mlp(d=8, classes=2))
        m.emb = torch.nn.Embedding(100, 8)
        return m

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (400, 12), generator=g)
    y = (tokens[:, 0] > 50).long()
    assert fit(tmp_path / "a", model(), *split(tokens, y)).findings == []
    train, _ = split(tokens, y)
    check = fit(tmp_path / "b", model(), train, DataLoader(train.dataset, batch_size=50))
    assert loud(check) == ["train-val-overlap"]


def test_few_shared_samples_are_info(tmp_path):
    x, y = blobs(n=1024)
    train, val = split(x, y)
    tx, ty = train.dataset.tensors
    vx, _ = val.dataset.tensors
    tx = torch.cat([tx, vx[:2]])
    ty = torch.cat([ty, ty[:2]])
    check = fit(tmp_path, Classifier(mlp()), DataLoader(TensorDataset(tx, ty), batch_size=32), val)
    assert loud(check) == [] and [f.code for f in check.findings] == ["train-val-overlap"]
    assert check.figures["shared"] == 2


def test_categorical_rows_repeat_by_chance(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (800, 4), generator=g).float()  # 81 possible rows: repeats are natural
    y = (x.sum(1) > 4).long()
    check = fit(tmp_path, Classifier(mlp(d=4, classes=2)), *split(x, y))
    assert loud(check) == []
    assert check.figures["fraction"] > 0.9 and check.figures["expected_by_chance"] > 100


def test_short_run_is_judged_on_the_sanity_check_batches(tmp_path):
    x, y = blobs(n=512)
    train, _ = split(x, y)
    check = fit(tmp_path, Classifier(mlp()), train, DataLoader(train.dataset, batch_size=64), max_steps=3)
    assert loud(check) == ["train-val-overlap"]


def test_fingerprints_are_exact_and_batch_independent():
    check = lr.TrainValOverlapCheck()
    x = torch.randn(10, 3, 40, 40)  # more values than MAX_POSITIONS: a fixed subset is hashed
    a = check.fingerprint(x)
    b = torch.cat([check.fingerprint(x[:3]), check.fingerprint(x[3:])])
    assert torch.equal(a, b) and a.unique().numel() == 10 and bool((a >= 0).all())
    assert torch.equal(check.fingerprint(torch.zeros(2, 5)), check.fingerprint(-torch.zeros(2, 5)))
    y = x.clone()
    y[0, 0, 0, 0] += 1e-3
    assert check.fingerprint(x[:1, :, :4])[0] != check.fingerprint(y[:1, :, :4])[0]
    tokens = torch.randint(0, 50000, (4, 7))
    assert check.fingerprint(tokens).unique().numel() == 4


def test_resumed_run_does_not_judge_and_state_survives(tmp_path):
    check = lr.TrainValOverlapCheck()
    x, y = blobs(n=512)
    train, _ = split(x, y)
    fit(tmp_path, Classifier(mlp()), train, DataLoader(train.dataset, batch_size=64), check=check)
    again = lr.TrainValOverlapCheck()
    again.load_state_dict(check.state_dict())
    assert again.done and [f.code for f in again.findings] == ["train-val-overlap"]


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="max_fraction"):
        lr.TrainValOverlapCheck(max_fraction=0)
    with pytest.raises(ValueError, match="min_count"):
        lr.TrainValOverlapCheck(min_count=0)
    with pytest.raises(TypeError, match="get_input"):
        lr.TrainValOverlapCheck(get_input=3)


def test_short_token_chunks_repeat_by_nature(tmp_path):
    """A character-level LM on 6-token chunks of text made of 30 words: common chunks occur in
    both halves of the text, as they do within the training half."""

    class CharLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(27, 16)
            self.out = torch.nn.Linear(16, 27)

        def step(self, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.out(self.emb(x)).reshape(-1, 27), y.reshape(-1))

        def training_step(self, batch, batch_idx):
            return self.step(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.step(batch))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    words = [torch.randint(1, 27, (int(k),), generator=g) for k in torch.randint(2, 6, (30,), generator=g)]
    picks = torch.randint(0, 30, (3000,), generator=g).tolist()
    text = torch.cat([torch.cat([words[i], torch.zeros(1, dtype=torch.long)]) for i in picks])
    chunks = text[: (len(text) // 7) * 7].view(-1, 7)
    x, y = chunks[:, :-1], chunks[:, 1:]
    n_val = len(x) // 10
    train = DataLoader(TensorDataset(x[n_val:], y[n_val:]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[:n_val], y[:n_val]), batch_size=64)
    check = fit(tmp_path / "a", CharLM(), train, val)
    assert loud(check) == [] and check.figures["fraction"] > 0.1
    assert check.figures["fraction"] < 2 * check.figures["train_repeat_rate"]
    check = fit(tmp_path / "b", CharLM(), train, DataLoader(train.dataset, batch_size=64))
    assert loud(check) == ["train-val-overlap"]


class TailForecaster(L.LightningModule):
    """Both loaders yield whole series; the step trains on windows of the early part and
    validates on the held-out tail (neuralforecast's layout). ``leaky`` validates on the same
    part it trains on (a real leak: the same samples and the same targets)."""

    def __init__(self, leaky=False):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.leaky = leaky

    def _windows(self, series, end):
        starts = range(0, end - 8)
        x = torch.stack([series[:, s : s + 8] for s in starts], 1).reshape(-1, 8)
        y = torch.stack([series[:, s + 8] for s in starts], 1).reshape(-1)
        return x, y

    def training_step(self, batch, batch_idx):
        (series,) = batch
        x, y = self._windows(series, series.shape[1] - 4)
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        (series,) = batch
        if self.leaky:
            x, y = self._windows(series, series.shape[1] - 4)
        else:  # the last 4 values, never a training target
            x = torch.stack([series[:, s - 8 : s] for s in range(series.shape[1] - 4, series.shape[1])], 1)
            x, y = x.reshape(-1, 8), series[:, -4:].reshape(-1)
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("leaky", [False, True])
def test_a_split_made_inside_the_step_is_info_a_real_leak_warns(tmp_path, leaky):
    g = torch.Generator().manual_seed(0)
    series = torch.randn(64, 1, generator=g) + 0.3 * torch.randn(64, 32, generator=g).cumsum(1)
    loader = DataLoader(TensorDataset(series), batch_size=16)
    check = fit(tmp_path, TailForecaster(leaky), loader, DataLoader(TensorDataset(series), batch_size=16))
    assert check.figures["fraction"] == 1.0  # the same series in both loaders
    if leaky:
        assert loud(check) == ["train-val-overlap"]
        assert check.figures["validation_targets_seen_in_training"] == 1.0
    else:
        assert loud(check) == [] and [f.code for f in check.findings] == ["train-val-overlap"]
        assert check.figures["validation_targets_seen_in_training"] == 0.0
        assert "inside the step" in check.findings[0].message


class MaskedNodes(L.LightningModule):
    """Transductive node classification (PyG's Planetoid layout, without PyG): every batch is the
    one graph, the loss reads the training nodes' predictions, validation the validation nodes'.
    ``leaky`` validates on the training nodes (a real leak: the same samples, the same labels)."""

    def __init__(self, leaky=False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        self.leaky = leaky

    def training_step(self, batch, batch_idx):
        out = self.net(batch["x"])
        return torch.nn.functional.cross_entropy(out[batch["train_mask"]], batch["y"][batch["train_mask"]])

    def validation_step(self, batch, batch_idx):
        mask = batch["train_mask"] if self.leaky else batch["val_mask"]
        out = self.net(batch["x"])
        self.log("val_loss", torch.nn.functional.cross_entropy(out[mask], batch["y"][mask]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class OneGraph(torch.utils.data.Dataset):
    def __init__(self, n=300):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 16, generator=g) + torch.nn.functional.one_hot(self.y, 16).float()
        perm = torch.randperm(n, generator=g)
        self.train_mask = torch.zeros(n, dtype=torch.bool)
        self.val_mask = torch.zeros(n, dtype=torch.bool)
        self.train_mask[perm[:120]] = True
        self.val_mask[perm[120:200]] = True

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return {"x": self.x, "y": self.y, "train_mask": self.train_mask, "val_mask": self.val_mask}


@pytest.mark.parametrize("leaky", [False, True])
def test_train_val_masks_over_one_graph_are_info_validating_on_training_nodes_warns(tmp_path, leaky):
    def loader():
        return DataLoader(OneGraph(), batch_size=None)

    check = fit(tmp_path, MaskedNodes(leaky), loader(), loader(), max_epochs=3)
    assert check.figures["fraction"] == 1.0  # the same nodes in both loaders
    if leaky:
        assert loud(check) == ["train-val-overlap"]
        assert check.figures["validation_predictions_seen_in_training"] == 1.0
    else:
        assert loud(check) == [] and [f.code for f in check.findings] == ["train-val-overlap"]
        assert check.figures["validation_predictions_seen_in_training"] == 0.0
        assert (
            "train/val masks" in check.findings[0].message and "80 predictions" in check.findings[0].message
        )
