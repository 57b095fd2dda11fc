"""FutureLeakCheck: models that see their own target are caught, honest sequence models stay quiet."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from lightning_recipe.checks.future_leak import FutureLeakCheck
from models import trainer
from seq_models import (
    RNNLM,
    VOCAB,
    CharTransformer,
    Forecaster,
    HFStyleLM,
    MaskedLM,
    NanoGPT,
    Seq2Seq,
    SeqClassifier,
    SeqRegressor,
    Tagger,
    TimeFirstTransformer,
    first_batch,
    forecasting_windows,
    loader,
    markov_tokens,
    padded_tokens,
    series,
)

TOKENS = markov_tokens(32, 33)
SERIES = series(32, 33)
IDS, MASK = padded_tokens(32, 33)
SRC = TOKENS[:, :12]


def probe(model, batch, **kw):
    check = FutureLeakCheck(**kw)
    check.run_check(None, model, batch)  # trainer=None: the preflight path
    return check


def loud(check):
    return [f for f in check.findings if f.severity.value in ("warning", "error")]


def step_series(n=32, length=21, hold=30):
    """A persistent series: random levels held for ``hold`` steps on average (stock-like)."""
    g = torch.Generator().manual_seed(5)
    jumps = torch.rand(n, length, generator=g) < 1 / hold
    levels = torch.randn(n, length, generator=g).cumsum(1)
    out = torch.empty(n, length)
    out[:, 0] = levels[:, 0]
    for t in range(1, length):
        out[:, t] = torch.where(jumps[:, t], levels[:, t], out[:, t - 1])
    return out


STEPS = step_series()


def healthy_cases():
    lm_tokens = first_batch(TOKENS)
    hf = first_batch(IDS, IDS.clone(), MASK, keys=("input_ids", "labels", "attention_mask"))
    label = TOKENS[:, :5].sum(1) % 4
    cov_x, cov_y = forecasting_windows()
    plain_x, plain_y = forecasting_windows(covariates=False)
    return {
        "transformer-causal-flat": (CharTransformer(True), lm_tokens),
        "transformer-causal-bvt": (CharTransformer(True, loss_layout="bvt"), lm_tokens),
        "transformer-causal-time-first": (TimeFirstTransformer(True), lm_tokens),
        "gru-lm-shifted-inside": (RNNLM("gru"), lm_tokens),
        "lstm-lm-x-y": (RNNLM("lstm"), first_batch(TOKENS[:, :-1], TOKENS[:, 1:])),
        "hf-dict-ignore-index": (HFStyleLM("index"), hf),
        "hf-dict-padding-in-loss": (HFStyleLM("none"), hf),  # a padding bug, not a future leak
        "masked-lm": (MaskedLM(), lm_tokens),
        "masked-lm-scoring-every-position": (MaskedLM(score_all=True), lm_tokens),
        "sequence-classifier": (SeqClassifier(), first_batch(TOKENS, label, keys=("input_ids", "label"))),
        "bidirectional-tagger": (Tagger(), first_batch(TOKENS, TOKENS % 5)),
        "forecaster-known-future-covariates": (Forecaster(2), first_batch(cov_x, cov_y)),
        "forecaster-plain-window": (Forecaster(1), first_batch(plain_x, plain_y)),
        "forecaster-on-a-persistent-series": (
            Forecaster(1),
            first_batch(STEPS[:, :16, None], STEPS[:, 16:20]),
        ),
        "causal-float-regressor": (SeqRegressor(), first_batch(SERIES[:, :-1, None], SERIES[:, 1:])),
        "bidirectional-denoiser": (SeqRegressor(True), first_batch(SERIES[:, :, None], SERIES)),
        "hand-written-gpt-masked-fill": (NanoGPT(True), first_batch(TOKENS[:, :-1], TOKENS[:, 1:])),
        "seq2seq-copy-task": (Seq2Seq(), first_batch(SRC, SRC)),
        "seq2seq-reverse-task": (Seq2Seq(), first_batch(SRC, SRC.flip(1))),
    }


def broken_cases():
    lm_tokens = first_batch(TOKENS)
    leak_x, leak_y = forecasting_windows(covariates=False, leak=True)
    return {
        "transformer-without-causal-mask": (CharTransformer(False), lm_tokens, 1),
        "transformer-without-mask-bvt": (CharTransformer(False, loss_layout="bvt"), lm_tokens, 1),
        "padded-transformer-without-mask": (CharTransformer(False), first_batch(IDS), 1),
        "time-first-transformer-without-mask": (TimeFirstTransformer(False), lm_tokens, 1),
        "gru-logits-1-vs-tokens-1": (RNNLM(bug="logits-shift"), lm_tokens, 1),
        "gru-unshifted-targets": (RNNLM(bug="unshifted"), lm_tokens, 0),
        "forecast-window-includes-forecast-day": (Forecaster(1), first_batch(leak_x, leak_y), 16),
        "single-step-window-includes-the-target": (
            Forecaster(1, horizon=1),
            first_batch(SERIES[:, :17, None], SERIES[:, 16:17]),
            16,
        ),
        "bidirectional-float-next-step": (
            SeqRegressor(True),
            first_batch(SERIES[:, :-1, None], SERIES[:, 1:]),
            1,
        ),
        "causal-float-unshifted": (SeqRegressor(), first_batch(SERIES[:, :, None], SERIES), 0),
        "hand-written-gpt-without-mask": (NanoGPT(False), first_batch(TOKENS[:, :-1], TOKENS[:, 1:]), 1),
        "hand-written-gpt-y-equals-x": (NanoGPT(True), first_batch(TOKENS[:, :-1], TOKENS[:, :-1]), 0),
        "seq2seq-decoder-fed-its-targets": (Seq2Seq(True), first_batch(SRC, SRC.flip(1)), 0),
    }


@pytest.mark.parametrize("name", list(healthy_cases()))
def test_healthy_sequence_models_are_quiet(name):
    model, batch = healthy_cases()[name]
    check = probe(model, batch)
    assert not loud(check), check.findings
    assert not check.has_reported("check-skipped"), check.findings
    if check.figures.get("aligned"):  # a shifted copy of the input was found: the gradient says 0
        assert check.figures["leak"] == 0.0 or check.figures["shift"] == 0, check.figures


@pytest.mark.parametrize("name", list(broken_cases()))
def test_models_that_see_their_target_are_an_error(name):
    model, batch, shift = broken_cases()[name]
    check = probe(model, batch)
    assert [f.code for f in loud(check)] == ["future-leak"], check.findings
    finding = check.findings[0]
    assert finding.severity.value == "error"
    assert finding.evidence["shift"] == shift and finding.evidence["match"] >= 0.99
    assert finding.evidence["leak"] > 1e-3


def test_the_real_model_is_untouched():
    model = CharTransformer(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = first_batch(TOKENS)
    rng = torch.get_rng_state()
    model.train()
    probe(model, batch)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


class OneHotLM(RNNLM):
    """Reads one-hot vectors instead of an embedding: nothing to put a gradient on."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(VOCAB, 32, batch_first=True)

    def forward(self, x):
        return self.out(self.rnn(F.one_hot(x, VOCAB).float())[0])


def test_integer_inputs_without_an_embedding_are_not_judged():
    check = probe(OneHotLM(), first_batch(TOKENS))
    assert not loud(check) and "no sequence input" in check.figures["aligned"]


def test_in_a_fit_the_suite_reports_the_missing_causal_mask(tmp_path):
    torch.manual_seed(0)
    tokens = markov_tokens(64, 33)
    callbacks = lr.recipe_callbacks(
        verbose=False, **{name: False for name in ("gradient_check", "overfit_batch", "model_lint")}
    )
    t = trainer(tmp_path, callbacks, logger=None, max_steps=2)
    t.fit(CharTransformer(False), loader(tokens))
    found = [(f.code, f.source) for f in lr.findings(t) if f.severity.value != "info"]
    assert ("future-leak", "FutureLeakCheck") in found, found
    assert ("loss-includes-padding", "PaddingCheck") not in found


def test_manual_optimisation_needs_step_fn():
    model = RNNLM()
    model.automatic_optimization = False
    check = probe(model, first_batch(TOKENS))
    assert [f.code for f in check.findings] == ["check-skipped"]
    assert "step_fn" in check.findings[0].message
    check = probe(model, first_batch(TOKENS), step_fn=lambda m, b: RNNLM.training_step(m, b, 0))
    assert not check.findings and check.figures["aligned"] is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch": 0}, "max_batch"),
        ({"num_positions": 1.5}, "num_positions"),
        ({"tolerance": 0}, "tolerance"),
        ({"min_match": 1.0}, "min_match"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FutureLeakCheck(**kwargs)
