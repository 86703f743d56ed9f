"""Recipes: YAML files loaded into strict, typed dataclasses, with ``key.sub=value`` overrides.

``loader``: the generic strict YAML-to-dataclass loader (unknown keys, wrong types and impossible
values raise :class:`RecipeError` naming the dotted key and the file); ``schema``: the recipe's
sections (``Recipe``, ``DataConfig``, ...). Only the standard library and yaml are imported, so every
layer may import this package.
"""

from af_train.config.loader import RecipeError, apply_overrides, build_dataclass, parse_override, to_plain
from af_train.config.schema import (
    DataConfig,
    MixupConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ProbeConfig,
    Recipe,
    StreamConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig", "MixupConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "ProbeConfig", "Recipe",
    "RecipeError", "StreamConfig", "TrainConfig", "apply_overrides", "build_dataclass", "parse_override", "to_plain",
]
