"""ModelLintCheck: the recipe's list of common mistakes, measured on the model and its first steps.

One module per lint (``params_not_updating``, ``bias_before_norm``, ``output_no_bias``,
``train_eval_mode``, ``grad_not_zeroed``), the two measurements they share (``forward_probe``:
one forward pass of a copy; ``grad_watch``: gradient flags over the first optimizer steps), and
the callback that runs them (``check``). Only :class:`ModelLintCheck` is public.
"""

from lightning_recipe.checks.model_lint.check import ModelLintCheck

__all__ = ["ModelLintCheck"]
