"""Recipe loading: strict keys and types, overrides, impossible values, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from af_train.config import Recipe, RecipeError, apply_overrides, parse_override

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_types_and_defaults(tmp_path):
    path = write(
        tmp_path,
        """
data:
  train: /shards/train
  code_rows: [0, 1]
optim:
  lr: 1e-4          # YAML 1.1 reads this as a string: must still become a float
train:
  max_steps: 7
""",
    )
    recipe = Recipe.load(path)
    assert recipe.data.train == "/shards/train"
    assert recipe.data.code_rows == [0, 1]
    assert recipe.optim.lr == pytest.approx(1e-4) and isinstance(recipe.optim.lr, float)
    assert recipe.train.max_steps == 7
    assert recipe.data.mask_rate == 0.25  # default kept
    assert recipe.source == str(path)


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    path = write(tmp_path, "train:\n  max_stepz: 3\n")
    with pytest.raises(RecipeError) as info:
        Recipe.load(path)
    message = str(info.value)
    assert "train.max_stepz" in message and str(path) in message and "max_steps" in message


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'trian'.*allowed keys: .*train"):
        Recipe.load(write(tmp_path, "trian: {}\n"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train:\n  max_steps: ten\n", "train.max_steps' must be int"),
        ("train:\n  max_steps: 2.5\n", "train.max_steps' must be int"),
        ("data:\n  shuffle: 1\n", "data.shuffle' must be bool"),
        ("data:\n  code_rows: 0\n", "data.code_rows' must be list[int]"),
        ("train:\n  precision: fp8\n", "'bf16', 'fp16', 'fp32'"),
        ("model:\n  preset: huge\n", "'tiny', 'small', 'base', 'large'"),
        ("data: [1, 2]\n", "key 'data' must be a mapping"),
    ],
)
def test_wrong_types_are_named(tmp_path, text, fragment):
    with pytest.raises(RecipeError) as info:
        Recipe.load(write(tmp_path, text))
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("data:\n  mask_rate: 1.5\n", "data.mask_rate must be in [0, 1)"),
        ("data:\n  mask_token_fraction: 0.95\n", "sum to <= 1"),
        ("train:\n  zero_stage: 4\n", "train.zero_stage must be 0, 1, 2 or 3"),
        ("train:\n  micro_batch_size: 0\n", "train.micro_batch_size must be >= 1"),
        ("optim:\n  lr: -1\n", "optim.lr must be > 0"),
        ("objective:\n  mode: ft2\n", "needs data.code_rows"),
    ],
)
def test_impossible_values(tmp_path, text, fragment):
    with pytest.raises(RecipeError) as info:
        Recipe.load(write(tmp_path, text))
    assert fragment in str(info.value)


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 7\n")
    recipe = Recipe.load(path, ["train.max_steps=11", "optim.lr=3e-4", "data.code_rows=[0,2]", "data.val=/v"])
    assert recipe.train.max_steps == 11
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.data.code_rows == [0, 2]
    assert recipe.data.val == "/v"
    assert "overrides" in recipe.source
    with pytest.raises(RecipeError, match="train.max_stepz"):
        Recipe.load(path, ["train.max_stepz=3"])
    with pytest.raises(RecipeError, match="key.sub=value"):
        Recipe.load(path, ["train.max_steps"])
    with pytest.raises(RecipeError, match="'max_steps' is a value"):
        Recipe.load(path, ["train.max_steps.x=1"])


def test_parse_override_values():
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=1e-3") == (["a"], 1e-3)
    assert parse_override("a=s3://bucket/x") == (["a"], "s3://bucket/x")
    assert apply_overrides({}, ["x.y.z=2"]) == {"x": {"y": {"z": 2}}}


def test_yaml_round_trip_and_hash(tmp_path):
    recipe = Recipe.load(write(tmp_path, "train:\n  max_steps: 9\ndeepspeed:\n  wall_clock_breakdown: true\n"))
    dumped = recipe.to_yaml()
    again = Recipe.from_dict(yaml.safe_load(dumped), "dumped")
    assert again.to_dict() == recipe.to_dict()
    assert again.hash() == recipe.hash()
    changed = Recipe.load(tmp_path / "recipe.yaml", ["train.max_steps=10"])
    assert changed.hash() != recipe.hash()


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(write(tmp_path, "train: [unclosed\n"))


def written_values(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{dotted key: value}`` of every leaf of a YAML mapping, as PyYAML read it."""
    leaves: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(written_values(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


SHIPPED = sorted(RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_holds_what_its_file_says_and_has_its_own_run_dir(path):
    """Every value a shipped recipe writes reaches the loaded recipe (none dropped or replaced by a default),
    and no other shipped recipe writes into its run directory (``--resume auto`` would resume the wrong run)."""
    loaded = Recipe.load(path).to_dict()
    for key, value in written_values(yaml.safe_load(path.read_text(encoding="utf-8"))).items():
        section, *rest = key.split(".")
        held = loaded[section]
        for part in rest:
            held = held[part]
        expected = float(value) if isinstance(held, float) and isinstance(value, (str, int)) else value
        assert held == expected, f"{path.name}: {key} is {value!r} in the file but {held!r} once loaded"
    run_dir = loaded["train"]["run_dir"]
    others = [other.name for other in SHIPPED if other != path and Recipe.load(other).train.run_dir == run_dir]
    assert not others, f"{path.name} and {others} all write into {run_dir}"
