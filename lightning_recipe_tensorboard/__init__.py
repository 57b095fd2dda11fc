"""The "Recipe" tab of TensorBoard: lightning_recipe's checklist of every run in the log directory.

TensorBoard finds :class:`~lightning_recipe_tensorboard.plugin.RecipePlugin` through the
``tensorboard_plugins`` entry point of the ``lightning-recipe`` package; nothing to configure:

    tensorboard --logdir runs/        # then open the "Recipe" tab

This is a package of its own, next to ``lightning_recipe``, so that TensorBoard starts as fast as
without it and answers at once: it loads no torch and no Lightning. The checklist itself
(:mod:`lightning_recipe.checklist`, which needs only the standard library and
:mod:`lightning_recipe.findings`) is loaded from the package's folder on the first request.
"""

PLUGIN_NAME = "recipe"
