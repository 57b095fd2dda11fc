"""``python -m lightning_recipe`` runs the command line."""

import sys

from lightning_recipe.cli import main

sys.exit(main())
