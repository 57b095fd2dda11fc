"""CheckpointEnsemble: the recipe's cheap ensembles from one run, measured on the validation data.

By concern:

* ``callback``: :class:`CheckpointEnsemble` (Lightning's hooks, what runs when, resume state);
* ``averaging``: the exponential average of the weights (``torch.optim.swa_utils``);
* ``snapshots``: the kept checkpoints, in CPU memory or in files;
* ``predictions``: averaging the members' predictions, per-batch loss/accuracy sums;
* ``evaluation``: one evaluation's state, its reduction over the ranks, the verdict;
* ``batchnorm``: BatchNorm statistics for the averaged weights (and their DDP average);
* ``export``: what you get back (the ensemble module, the averaged model and checkpoint).
* ``sharding``: the same under FSDP2: snapshots and EMA kept as each rank's shards, members
  rebuilt whole at each evaluation, or a skip with the memory it would need.
"""

from lightning_recipe.control.ensemble.callback import CheckpointEnsemble

__all__ = ["CheckpointEnsemble"]
