"""BatchIndependenceCheck: healthy models are silent, batch-mixing bugs are caught."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from models import (
    Classifier,
    GRUNet,
    ManualClassifier,
    TinyTransformer,
    blobs,
    cnn,
    image_blobs,
    loaders,
    mlp,
    token_blobs,
    trainer,
)


def first_batch(x, y, dict_keys=None, batch_size=32):
    train, _ = loaders(x, y, batch_size=batch_size, dict_keys=dict_keys, shuffle=False)
    return next(iter(train))


def probe(model, batch, **kw):
    check = BatchIndependenceCheck(**kw)
    check.run_check(None, model, batch)  # trainer=None: the preflight path
    return check


def codes(check, severity=None):
    return [f.code for f in check.findings if severity is None or f.severity.value == severity]


# ---------------------------------------------------------------------------- models
class ViewInsteadOfPermute(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) done with a view: mixes channels and samples."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, classes)

    def forward(self, x):
        h = self.conv(x)
        b = h.shape[0]
        h = h.view(8, b, 64).transpose(0, 1)  # should be h.permute / h.flatten(2)
        return self.fc(h.reshape(b, -1))


class TransposedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x.t().reshape(x.shape[0], -1))


class BatchMeanInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x - x.mean(0))


class TimeFirstGRUFedBatchFirst(GRUNet):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(16, 16)  # batch_first=False, but gets (B, T, D)


class FlatLM(nn.Module):
    """A healthy language model whose forward returns (B*T, V) logits."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h, _ = self.rnn(self.emb(tokens))
        return self.head(h).reshape(-1, self.head.out_features)


class LMClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        tokens, next_tokens = batch
        return F.cross_entropy(self(tokens), next_tokens.reshape(-1))


class TimeMajorLM(FlatLM):
    """Healthy time-major code: tokens transposed to (T, B) before the embedding."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(16, 16)

    def forward(self, tokens):
        h, _ = self.rnn(self.emb(tokens.t()))
        return self.head(h).transpose(0, 1).reshape(-1, self.head.out_features)


def lm_data(n=64, length=12, vocab=50):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, torch.roll(x, -1, dims=1)


# ---------------------------------------------------------------------------- healthy
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "dict", "gru", "transformer"])
def test_healthy_models_have_no_leak(seed, kind):
    torch.manual_seed(seed)
    if kind == "cnn":
        model, batch = Classifier(cnn()), first_batch(*image_blobs(seed=seed))
    elif kind in ("gru", "transformer"):
        net = GRUNet() if kind == "gru" else TinyTransformer()
        model, batch = Classifier(net), first_batch(*token_blobs(seed=seed))
    else:
        keys = ("features", "label") if kind == "dict" else None
        model = Classifier(mlp(), x_key="features", y_key="label")
        batch = first_batch(*blobs(seed=seed), dict_keys=keys)
    check = probe(model, batch)
    assert codes(check) == []
    assert check.figures["max_leak"] == 0.0
    assert check.figures["batch_size"] == 7 and check.figures["probes"] == [0, 3, 6]
    if kind in ("gru", "transformer"):
        assert "embedding 'net.emb'" in check.figures["gradient_at"]


def test_flattened_sequence_logits_are_not_used():
    torch.manual_seed(0)
    check = probe(LMClassifier(FlatLM()), first_batch(*lm_data()))
    assert codes(check) == []
    assert check.figures["output"].startswith("the last submodule output (7, 12, 50)")


class Contrastive(Classifier):
    """In-batch negatives: the (B, B) similarity matrix mixes samples by design."""

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        z1, z2 = self(x), self(x + 0.1 * torch.ones_like(x))
        logits = z1 @ z2.t() / 0.1
        return F.cross_entropy(logits, torch.arange(len(x)))


def test_in_batch_similarities_are_not_mistaken_for_mixing():
    torch.manual_seed(0)
    check = probe(Contrastive(mlp(classes=8)), first_batch(*blobs()))
    assert codes(check) == [] and check.figures["output"] == "the forward output (7, 8)"

    class SimilarityOnly(Contrastive):
        def training_step(self, batch, batch_idx):
            z = self.net(batch[0])  # forward not called: the loss input is (B, B)
            return F.cross_entropy(z @ z.t(), torch.arange(len(z)))

    check = probe(SimilarityOnly(mlp(classes=8)), first_batch(*blobs()))
    assert codes(check) == [] and check.figures["output"].startswith("the last submodule output (7, ")


def test_time_major_code_is_skipped_not_flagged():
    torch.manual_seed(0)
    check = probe(LMClassifier(TimeMajorLM()), first_batch(*lm_data()))
    assert codes(check) == ["check-skipped"]
    assert "nn.Embedding" in check.findings[0].message


# ---------------------------------------------------------------------------- broken
@pytest.mark.parametrize(
    "make, data, low",
    [
        (ViewInsteadOfPermute, image_blobs, 0.3),
        (TransposedReshape, blobs, 0.3),
        (BatchMeanInForward, blobs, 0.1),
        (TimeFirstGRUFedBatchFirst, token_blobs, 0.1),
    ],
)
def test_batch_mixing_is_an_error(make, data, low):
    torch.manual_seed(0)
    check = probe(Classifier(make()), first_batch(*data()))
    assert codes(check) == ["batch-mixing"]
    f = check.findings[0]
    assert f.severity is lr.Severity.ERROR
    assert f.evidence["max_leak"] > low and f.evidence["pairs"][0]["leak"] == f.evidence["max_leak"]
    assert all(p["from"] != p["to"] for p in f.evidence["pairs"])
    assert f"{f.evidence['pairs'][0]['leak']:.2g}" in f.message and "permute" in f.message


def test_batch_mean_leak_is_one_over_batch_minus_one():
    check = probe(Classifier(BatchMeanInForward()), first_batch(*blobs()))
    assert check.findings[0].evidence["max_leak"] == pytest.approx(1 / 6, rel=1e-4)


def test_batchnorm_without_running_stats_is_a_warning():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(), nn.Linear(32, 4)
    )
    check = probe(Classifier(net), first_batch(*blobs()))
    assert codes(check, "warning") == ["batch-mixing"]
    assert check.findings[0].evidence["batch_statistics_layers"] == ["net.1"]


def test_hard_coded_batch_size_falls_back_to_the_full_batch():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x.view(32, 16))

    check = probe(Classifier(Fixed()), first_batch(*blobs()))
    assert codes(check) == [] and check.figures["batch_size"] == 32


# ---------------------------------------------------------------------------- skips
def test_skips_are_info_with_the_reason():
    x, y = blobs()
    check = probe(Classifier(mlp()), first_batch(x, y, batch_size=1))
    assert codes(check) == ["check-skipped"] and "1 sample" in check.findings[0].message

    # no known key: the float tensor is the input (read by structure, no skip)
    check = probe(Classifier(mlp(), x_key="pixels", y_key="digit"), {"pixels": x[:8], "digit": y[:8]})
    assert codes(check) == [] and "max_leak" in check.figures

    class OneHot(nn.Module):
        def forward(self, tokens):
            return F.one_hot(tokens, 50).float().mean(1)[:, :3]

    check = probe(Classifier(OneHot()), first_batch(*token_blobs()))
    assert codes(check) == ["check-skipped"] and "nn.Embedding" in check.findings[0].message

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 4)

    check = probe(Classifier(Constant()), first_batch(x, y))
    assert codes(check) == ["check-skipped"] and "depends on the input" in check.findings[0].message


def test_manual_optimisation_needs_step_fn():
    batch = first_batch(*blobs())
    check = probe(ManualClassifier(TransposedReshape()), batch)
    assert codes(check) == ["check-skipped"] and "step_fn" in check.findings[0].message
    check = probe(
        ManualClassifier(TransposedReshape()), batch, step_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])
    )
    assert codes(check) == ["batch-mixing"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_probes"):
        BatchIndependenceCheck(num_probes=0)
    with pytest.raises(ValueError, match="max_batch"):
        BatchIndependenceCheck(max_batch=1)
    with pytest.raises(ValueError, match="tolerance"):
        BatchIndependenceCheck(tolerance=1.5)
    with pytest.raises(TypeError, match="get_input"):
        BatchIndependenceCheck(get_input="x")


# ---------------------------------------------------------------------------- in a fit
def test_in_a_fit_it_fires_once_and_can_raise(tmp_path):
    train, val = loaders(*blobs())
    check = BatchIndependenceCheck()
    with pytest.warns(lr.RecipeWarning, match=r"\[batch-mixing\]"):
        trainer(tmp_path / "a", [check], max_steps=3).fit(Classifier(BatchMeanInForward()), train, val)
    assert codes(check) == ["batch-mixing"] and check.done
    check = BatchIndependenceCheck(on_error="raise")
    with pytest.raises(lr.RecipeError, match="batch-mixing"):
        trainer(tmp_path / "b", [check], max_steps=3).fit(Classifier(BatchMeanInForward()), train, val)


def fit_weights(tmp_path, callbacks):
    L.seed_everything(7, verbose=False)
    model = Classifier(cnn(), lr=1e-2)
    train, val = loaders(*image_blobs())
    trainer(tmp_path, callbacks, logger=None, max_steps=4).fit(model, train, val)
    return model.state_dict(), torch.get_rng_state()


def test_the_run_is_bit_identical_with_the_check(tmp_path):
    w0, r0 = fit_weights(tmp_path / "plain", [])
    check = BatchIndependenceCheck()
    w1, r1 = fit_weights(tmp_path / "check", [check])
    assert check.figures["max_leak"] == 0.0 and codes(check) == []
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and torch.equal(r0, r1)
