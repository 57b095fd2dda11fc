from lightning_recipe.callback import RecipeCallback


class TargetInInputCheck(RecipeCallback):
    pass
