"""Every shipped config validates and names recipes that exist; `tunekit ls` lists every recipe."""

import pytest

from tunekit import _paths
from tunekit.cli.main import main
from tunekit.config import load, validate
from tunekit.config.catalog import config_recipes, recipe_schema

CONFIG_FILES = sorted(_paths.configs_dir().rglob("*.yaml"))
RECIPE_FILES = sorted(p for p in _paths.recipes_dir().glob("*.py") if not p.name.startswith("_"))


def config_id(path):
    return path.relative_to(_paths.configs_dir()).with_suffix("").as_posix()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=config_id)
def test_shipped_config_validates_against_every_recipe_it_names(path):
    """Every key each named recipe reads is there with a valid value, and no key is ignored."""
    schemas = [(name, recipe_schema(_paths.recipes_dir() / f"{name}.py")) for name in config_recipes(path)]
    assert all(schema is not None for _, schema in schemas), "every shipped recipe declares its CONFIG"
    validate(load(path), schemas=schemas, source=str(path))


def test_every_shipped_recipe_declares_its_keys():
    for recipe in RECIPE_FILES:
        schema = recipe_schema(recipe)
        assert schema and all(isinstance(k, str) for k in schema), recipe


@pytest.mark.parametrize("path", CONFIG_FILES, ids=config_id)
def test_shipped_config_names_existing_recipes(path):
    recipes = config_recipes(path)
    assert recipes, f"{path}: no '# recipe: <name>' line in the leading comments"
    missing = [r for r in recipes if not (_paths.recipes_dir() / f"{r}.py").is_file()]
    assert not missing, f"{path}: names recipes that do not exist: {missing}"


def test_ls_lists_every_recipe_file(capsys):
    with pytest.raises(SystemExit) as info:
        main(["ls"])
    assert info.value.code == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line[:1].strip()}
    assert {p.stem for p in RECIPE_FILES} <= listed
