"""Training objectives: what a recipe's ``objective.mode`` trains, as one ``nn.Module`` per mode.

- ``build``: ``build_training_module(recipe, num_classes, multi_label, tokenizer)``, the module a
  recipe trains, with the checkpoints it starts from;
- ``modules``: the loss maths (``PretrainModule``, ``FineTuneModule``);
- ``terms``: ``LossTerm`` and the global counts the engine normalises the loss terms by.

The names callers need are importable from the package itself.
"""

from af_train.objectives.build import build_training_module
from af_train.objectives.modules import BatchError, FineTuneModule, PretrainModule, row_type_ids
from af_train.objectives.terms import LossTerm, global_loss_counts

__all__ = ["BatchError", "FineTuneModule", "LossTerm", "PretrainModule", "build_training_module",
           "global_loss_counts", "row_type_ids"]
