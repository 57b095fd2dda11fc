"""preflight(): the one-shot checks without a fit, on the callbacks' own code; model untouched."""

import subprocess
import sys

import pytest
import torch

import lightning_recipe as lr
from lightning_recipe.demo import DigitsCNN, DigitsDataModule
from models import Classifier, blobs, loaders, mlp


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.grad for p in model.parameters()],
        torch.get_rng_state(),
    )


def test_healthy_demo_model_is_clean_and_untouched(capsys):
    torch.manual_seed(0)
    model = DigitsCNN()
    before = snapshot(model)
    found = lr.preflight(model, DigitsDataModule())
    after = snapshot(model)
    assert [f for f in found if f.severity is not lr.Severity.INFO] == []
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1] == after[1] and all(g is None for g in after[2])
    assert torch.equal(before[3], after[3])
    out = capsys.readouterr().out
    assert "preflight cost" in out and "GradientCheck" in out


@pytest.mark.parametrize(
    ("bug", "code"),
    [
        ("batch-view", "batch-mixing"),
        ("custom-backward", "gradcheck-failed"),
        ("softmax", "softmax-before-loss"),
        ("sigmoid", "overfit-batch-failed"),
        ("detach", "params-not-updating"),
    ],
)
def test_each_broken_demo_variant_is_caught(bug, code):
    torch.manual_seed(0)
    found = lr.preflight(DigitsCNN(bug=bug), DigitsDataModule(), verbose=False)
    assert code in {f.code for f in found if f.severity is not lr.Severity.INFO}


def test_unnormalised_data_and_plain_loaders():
    torch.manual_seed(0)
    found = lr.preflight(DigitsCNN(), DigitsDataModule(normalize=False), verbose=False)
    assert "input-not-normalized" in {f.code for f in found}
    x, y = blobs()
    train, val = loaders(x, y)
    assert [
        f.code for f in lr.preflight(Classifier(mlp()), (train, val), verbose=False) if f.severity != "info"
    ] == []
    assert lr.preflight(Classifier(mlp()), train, verbose=False) is not None


def test_model_train_dataloader_is_used_when_no_data():
    x, y = blobs()
    train, _ = loaders(x, y)

    class WithLoader(Classifier):
        def train_dataloader(self):
            return train

    assert isinstance(lr.preflight(WithLoader(mlp()), verbose=False), list)
    with pytest.raises(ValueError, match="data"):
        lr.preflight(Classifier(mlp()), verbose=False)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        lr.preflight("not a model", verbose=False)
    with pytest.raises(ValueError, match="checks"):
        lr.preflight(Classifier(mlp()), loaders(*blobs())[0], checks=[int], verbose=False)
    with pytest.raises(TypeError, match="data"):
        lr.preflight(Classifier(mlp()), 42, verbose=False)


def test_selected_checks_only():
    found = lr.preflight(
        DigitsCNN(bug="softmax"), DigitsDataModule(), checks=[lr.DataInspectionCheck], verbose=False
    )
    assert {f.source for f in found} <= {"DataInspectionCheck"}


def test_cli_exit_codes():
    base = [sys.executable, "-m", "lightning_recipe", "preflight", "lightning_recipe.demo:DigitsCNN"]
    data = ["--data", "lightning_recipe.demo:DigitsDataModule"]
    ok = subprocess.run([*base, *data], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(
        [*base, *data, "--model-args", '{"bug": "batch-view"}'], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 1 and "batch-mixing" in bad.stdout
    never = subprocess.run(
        [*base, *data, "--model-args", '{"bug": "batch-view"}', "--fail-on", "never"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert never.returncode == 0


def test_zero_initialised_gate_is_not_called_not_updating():
    """ReZero / LoRA style: the gated branch gets no gradient at step 0, then does."""

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = mlp()
            self.branch = torch.nn.Linear(16, 4)
            self.alpha = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.base(x) + self.alpha * self.branch(x)

    found = lr.preflight(Classifier(Gated()), loaders(*blobs())[0], verbose=False)
    assert "params-not-updating" not in {f.code for f in found}
