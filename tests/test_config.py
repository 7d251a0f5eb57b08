"""tunekit.config: loading, overrides, interpolation, the asset resolver, instantiate, parse."""

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import tunekit
import tunekit._paths
from tunekit.config import ConfigError, apply_overrides, instantiate, load, parse

THIS = __name__  # components defined below are importable as f"{THIS}.<name>"


class Pair:
    def __init__(self, left, right=None):
        self.left, self.right = left, right


def scaled(x, scale, *, shift=0.0):
    return x * scale + shift


@pytest.fixture
def builtin_dir(tmp_path, monkeypatch):
    """A recipes/ folder with configs/fam/lora.yaml, used as the built-in one."""
    (tmp_path / "configs" / "fam").mkdir(parents=True)
    (tmp_path / "configs" / "fam" / "lora.yaml").write_text("# recipe: r\nlr: 0.5\n")
    monkeypatch.setattr(tunekit._paths, "recipes_dir", lambda: tmp_path)
    monkeypatch.setattr(tunekit._paths, "configs_dir", lambda: tmp_path / "configs")
    return tmp_path


def make(yaml_text: str) -> DictConfig:
    return OmegaConf.create(yaml_text)


# ---- loading ----------------------------------------------------------------------------------

def test_load_by_name_and_by_path(builtin_dir, tmp_path):
    assert load("fam/lora").lr == 0.5
    assert load("fam/lora.yaml").lr == 0.5
    assert load(builtin_dir / "configs" / "fam" / "lora.yaml", ["lr=0.25"]).lr == 0.25


def test_load_unknown_name_suggests_closest(builtin_dir):
    with pytest.raises(ConfigError, match=r"no built-in config named 'fam/lorra'; did you mean fam/lora\?"):
        load("fam/lorra")


def test_load_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file {missing} not found"):
        load(missing)


def test_load_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}: invalid YAML"):
        load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(bad)


def test_override_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: override lrr=2: no key 'lrr' .*did you mean lr\?"):
        load(path, ["lrr=2"])


# ---- overrides --------------------------------------------------------------------------------

def test_overrides_set_parse_values_like_yaml():
    cfg = make("a: {b: 1}\nl: [1, 2, 3]\nname: x\nflag: false")
    apply_overrides(cfg, ["a.b=1e-4", "l=[4,5]", "name='two words'", "flag=true", "a.b=${l.1}"])
    assert cfg.a.b == 5 and list(cfg.l) == [4, 5] and cfg.name == "two words" and cfg.flag is True


def test_overrides_delete_keys_and_list_items():
    cfg = make("a: {b: 1, c: 2}\nl: [1, 2, 3]")
    apply_overrides(cfg, ["~a.b", "~l.0"])
    assert OmegaConf.to_container(cfg) == {"a": {"c": 2}, "l": [2, 3]}
    with pytest.raises(ConfigError, match=r"override ~a.x: no key 'a.x' in the config; did you mean a.c\?"):
        apply_overrides(cfg, ["~a.x"])


def test_overrides_refuse_unknown_keys_but_allow_plus_and_component_arguments():
    cfg = make("batch_size: 2\nopt: {_component_: torch.optim.SGD, lr: 0.1}")
    with pytest.raises(ConfigError, match=r"no key 'batch_sise'.*did you mean batch_size\?.*\+batch_sise="):
        apply_overrides(cfg, ["batch_sise=4"])
    apply_overrides(cfg, ["+extra.deep=1", "opt.momentum=0.9"])
    assert cfg.extra.deep == 1 and cfg.opt.momentum == 0.9


def test_component_shortcut_swaps_component_and_keeps_arguments():
    cfg = make("opt: {_component_: torch.optim.AdamW, lr: 0.1, betas: [0.9, 0.95]}\nname: a.b")
    apply_overrides(cfg, ["opt=torch.optim.SGD", "~opt.betas", "name=c.d"])
    assert OmegaConf.to_container(cfg.opt) == {"_component_": "torch.optim.SGD", "lr": 0.1}
    assert cfg.name == "c.d"  # not a component node: a plain string value


@pytest.mark.parametrize("bad", ["novalue", "=1", "a..b=1", "~a=1", "a b=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="bad override .*use key=value, ~key to delete, or \\+key=value"):
        apply_overrides(make("a: 1"), [bad])


# ---- interpolation and assets -----------------------------------------------------------------

def test_interpolation_and_asset_resolver(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dim: 8\nmodel: {width: '${dim}'}\nckpt: ${asset:tiny_llama}\n"
                    "tok: ${asset:tiny_llama/tokenizer.model}\n")
    cfg = load(path, ["dim=16"])
    assert cfg.model.width == 16
    expected = Path(tunekit.__file__).resolve().parent / "assets" / "tiny_llama"
    assert cfg.ckpt == str(expected) and Path(cfg.ckpt).is_absolute() and Path(cfg.ckpt).is_dir()
    assert Path(cfg.tok).is_file()


def test_unknown_asset_says_which_exist():
    cfg = make("ckpt: ${asset:tiny_lama}")
    with pytest.raises(Exception, match=r"no shipped asset 'tiny_lama'.*did you mean tiny_llama\?"):
        cfg.ckpt


# ---- instantiate ------------------------------------------------------------------------------

def test_instantiate_nested_components_lists_and_plain_containers():
    cfg = make(f"""
    pair:
      _component_: {THIS}.Pair
      left: {{_component_: {THIS}.Pair, left: 1, right: {{k: [1, 2]}}}}
      right: [{{_component_: torch.nn.Identity}}, 3, {{plain: 1}}]
    """)
    pair = instantiate(cfg.pair)
    assert isinstance(pair.left, Pair) and pair.left.left == 1
    assert pair.left.right == {"k": [1, 2]} and type(pair.left.right) is dict
    assert type(pair.left.right["k"]) is list
    assert isinstance(pair.right[0], torch.nn.Identity) and pair.right[1:] == [3, {"plain": 1}]


def test_instantiate_positional_injection_and_keyword_overrides():
    cfg = make("dim: 3\nmodel: {_component_: torch.nn.Linear, in_features: '${dim}', out_features: 2}\n"
               "opt: {_component_: torch.optim.SGD, lr: 0.5}")
    model = instantiate(cfg.model)
    assert model.weight.shape == (2, 3)
    opt = instantiate(cfg.opt, model.parameters(), lr=0.25)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.25
    assert opt.param_groups[0]["params"][0] is model.weight


def test_instantiate_recipe_supplied_values():
    node = make(f"f: {{_component_: {THIS}.scaled, scale: 2.0, shift: '???'}}").f
    assert instantiate(node, 3.0, shift=1.0) == 7.0
    with pytest.raises(ConfigError, match=r"f.shift is \?\?\? \(to be passed by the recipe\)"):
        instantiate(node, 3.0)


def test_instantiate_errors():
    assert instantiate(None) is None
    with pytest.raises(ConfigError, match="a: cannot instantiate a node without _component_"):
        instantiate(make("a: {b: 1}").a)
    with pytest.raises(ConfigError, match=r"f: cannot call .*scaled with these arguments: .*'scale'"):
        instantiate(make(f"f: {{_component_: {THIS}.scaled}}").f, 1.0)
    with pytest.raises(ConfigError, match=r"f._component_: cannot import torch.optim.AdamWW; did you mean "
                                          r"torch.optim.AdamW\?"):
        instantiate(make("f: {_component_: torch.optim.AdamWW}").f)


# ---- parse (a recipe's command line) -----------------------------------------------------------

def test_parse_reads_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nopt: {_component_: torch.optim.SGD, lr: '${lr}'}\n")
    assert parse(["--config", str(path), "lr=2"]).opt.lr == 2
    assert parse([f"--config={path}"]).opt.lr == 1


@pytest.mark.parametrize("argv, message", [
    (["lr=2"], "missing --config"),
    (["--config"], "--config needs a value"),
    (["--config", "c.yaml", "--lr", "2"], "unknown option '--lr'"),
    (["--config", "{path}", "opt.lrr=2"], "opt.lrr: no such argument of torch.optim.SGD; did you mean lr?"),
])
def test_parse_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TUNEKIT_DEBUG", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("opt: {_component_: torch.optim.SGD, lr: 1}\n")
    argv = [a.replace("{path}", str(path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tunekit: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_parse_debug_env_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEKIT_DEBUG", "1")
    with pytest.raises(ConfigError, match="missing --config"):
        parse([])


def test_this_module_is_importable_by_name():
    # The components above are named by module name; guard against an import mode that breaks it.
    assert sys.modules[THIS].Pair is Pair
