"""neuralforecast: an ``LSTM`` with a ``DistributionLoss`` (a Normal likelihood) through
``NeuralForecast.fit`` (the standalone ``pytorch_lightning`` namespace; the library builds the
Trainer from the model's keyword arguments and its windows batches are dicts), on synthetic
series in the library's long format (``unique_id``, ``ds``, ``y``), as its docs do."""

from __future__ import annotations

import _harness
from neuralforecast_nhits import fit_model


def fit(recipe):
    from neuralforecast.losses.pytorch import DistributionLoss
    from neuralforecast.models import LSTM

    return fit_model(
        recipe,
        LSTM,
        encoder_hidden_size=32,
        decoder_hidden_size=32,
        loss=DistributionLoss(distribution="Normal", level=[80]),
    )


if __name__ == "__main__":
    _harness.run("neuralforecast", "LSTM with a Normal DistributionLoss", ["neuralforecast"], fit)
