"""PaddingCheck: a sequence loss averaged over padding is caught, masked losses stay quiet."""

import pytest
import torch
import torch.nn.functional as F

import lightning_recipe as lr
from lightning_recipe.checks.padding import PaddingCheck
from models import trainer
from seq_models import (
    PAD,
    RNNLM,
    CharTransformer,
    HFStyleLM,
    MaskedLM,
    Tagger,
    first_batch,
    loader,
    markov_tokens,
    padded_tokens,
)

TOKENS = markov_tokens(32, 33)
IDS, MASK = padded_tokens(32, 33)
HF_KEYS = ("input_ids", "labels", "attention_mask")


def probe(model, batch, **kw):
    check = PaddingCheck(**kw)
    check.run_check(None, model, batch)  # trainer=None: the preflight path
    return check


def loud(check):
    return [f for f in check.findings if f.severity.value in ("warning", "error")]


class IgnoringLM(RNNLM):
    """A padded GRU LM done right: ``ignore_index=PAD`` (or the logits selected by the mask)."""

    def __init__(self, how="ignore_index"):
        super().__init__()
        self.how = how

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits, y = self(tokens[:, :-1]), tokens[:, 1:]
        if self.how == "ignore_index":
            return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=PAD)
        if self.how == "class-weight":
            weight = torch.ones(logits.shape[-1]).index_fill(0, torch.tensor([PAD]), 0.0)
            return F.cross_entropy(logits.transpose(1, 2), y, weight=weight)
        keep = y != PAD
        return F.cross_entropy(logits[keep], y[keep])


def left_padded():
    """Each row's padding moved to its start (decoder-style left padding)."""
    lengths = MASK.sum(1)
    rows = [torch.cat([IDS[i, lengths[i] :], IDS[i, : lengths[i]]]) for i in range(len(IDS))]
    return torch.stack(rows)


def tags_ending_in_background():
    """NER-like tags: mostly the background tag 0, which always ends the sentence (no padding)."""
    g = torch.Generator().manual_seed(3)
    other = torch.randint(1, 5, TOKENS.shape, generator=g)
    tags = torch.where(torch.rand(TOKENS.shape, generator=g) < 0.8, 0, other)
    tags[:, -3:] = 0
    return tags


def healthy_cases():
    hf_labels = first_batch(IDS, IDS.clone(), MASK, keys=HF_KEYS)
    return {
        "unpadded-char-transformer": (CharTransformer(True), first_batch(TOKENS)),
        "unpadded-gru-x-y": (RNNLM(), first_batch(TOKENS[:, :-1], TOKENS[:, 1:])),
        "hf-dict-labels-minus-100": (HFStyleLM("index"), hf_labels),
        "hf-dict-masked-mean": (HFStyleLM("mask"), hf_labels),
        "padded-ignore-index": (IgnoringLM("ignore_index"), first_batch(IDS)),
        "padded-zero-class-weight": (IgnoringLM("class-weight"), first_batch(IDS)),
        "padded-logits-selected-by-mask": (IgnoringLM("select"), first_batch(IDS)),
        "masked-lm": (MaskedLM(), first_batch(TOKENS)),
        "tagger-background-at-sentence-end": (Tagger(), first_batch(TOKENS, tags_ending_in_background())),
    }


def broken_cases():
    hf_labels = first_batch(IDS, IDS.clone(), MASK, keys=HF_KEYS)
    return {
        "hf-dict-labels-padded-with-pad-id": (HFStyleLM("none"), hf_labels),
        "hf-dict-reduction-none-then-mean": (HFStyleLM("mean-none"), hf_labels),
        "gru-tokens-no-ignore-index": (RNNLM(), first_batch(IDS)),
        "gru-x-y-no-ignore-index": (RNNLM(), first_batch(IDS[:, :-1], IDS[:, 1:])),
        "transformer-flat-logits": (CharTransformer(True), first_batch(IDS)),
        "left-padded": (RNNLM(), first_batch(left_padded())),
    }


@pytest.mark.parametrize("name", list(healthy_cases()))
def test_losses_that_skip_padding_are_quiet(name):
    model, batch = healthy_cases()[name]
    check = probe(model, batch)
    assert not loud(check), check.findings
    assert not check.has_reported("check-skipped"), check.findings
    assert check.figures.get("share", 0.0) < 0.05, check.figures


@pytest.mark.parametrize("name", list(broken_cases()))
def test_a_loss_averaged_over_padding_is_a_warning(name):
    model, batch = broken_cases()[name]
    check = probe(model, batch)
    assert [f.code for f in loud(check)] == ["loss-includes-padding"], check.findings
    ev = check.findings[0].evidence
    assert check.findings[0].severity.value == "warning"
    assert ev["pad"] == PAD and 0.6 < ev["share"] < 0.9, ev
    assert ev["real_token_loss"] is not None and ev["loss"] > 0
    assert ev["side"] == ("start" if name == "left-padded" else "end")


def test_the_real_model_is_untouched():
    model = RNNLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = first_batch(IDS)
    rng = torch.get_rng_state()
    probe(model, batch)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_in_a_fit_the_suite_reports_the_padding(tmp_path):
    callbacks = lr.recipe_callbacks(
        verbose=False, **{name: False for name in ("gradient_check", "overfit_batch", "model_lint")}
    )
    t = trainer(tmp_path, callbacks, logger=None, max_steps=2)
    t.fit(RNNLM(), loader(padded_tokens(64, 33)[0]))
    found = [(f.code, f.source) for f in lr.findings(t) if f.severity.value != "info"]
    assert found == [("loss-includes-padding", "PaddingCheck")], found


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_share"):
        PaddingCheck(min_share=1.5)
