"""The tunekit command: ls, cp, cat, validate, run (in-process and torchrun), download, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunekit
import tunekit._paths
from tunekit.cli.main import main

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_RECIPE = ASSETS / "recipes" / "toy_recipe.py"
TOY_DISTRIBUTED = ASSETS / "recipes" / "toy_distributed.py"
TOY_CONFIG = ASSETS / "configs" / "toy.yaml"


def run_cli(*argv: str) -> int:
    """Run ``tunekit argv`` in this process and return its exit code."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code


def tunekit_subprocess(*argv: str, env=None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "TUNEKIT_DEBUG"}, "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunekit.cli.main", *map(str, argv)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def builtin(tmp_path, monkeypatch):
    """A fake built-in recipes/ folder: two recipes, a helper, configs with and without a recipe."""
    root = tmp_path / "recipes"
    (root / "configs" / "fam").mkdir(parents=True)
    (root / "lora_single_device.py").write_text(TOY_RECIPE.read_text())
    (root / "lora_distributed.py").write_text("if __name__ == '__main__':\n    print('distributed')\n")
    (root / "_shared.py").write_text("")
    (root / "configs" / "fam" / "lora.yaml").write_text(
        "# A LoRA config.\n# recipe: lora_single_device\n#   recipe: lora_distributed\n"
        + "".join(line for line in TOY_CONFIG.read_text().splitlines(keepends=True) if "recipe:" not in line))
    (root / "configs" / "fam" / "orphan.yaml").write_text("# nothing\nx: 1\n# recipe: ignored_after_yaml\n")
    monkeypatch.setattr(tunekit._paths, "recipes_dir", lambda: root)
    monkeypatch.setattr(tunekit._paths, "configs_dir", lambda: root / "configs")
    monkeypatch.delenv("TUNEKIT_DEBUG", raising=False)
    return root


def test_ls_discovers_recipes_and_configs(builtin, capsys):
    assert run_cli("ls") == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [["RECIPE", "CONFIG"], ["lora_distributed", "fam/lora"],
                     ["lora_single_device", "fam/lora"], ["(no", "recipe)", "fam/orphan"]]


def test_cp_recipe_and_config(builtin, tmp_path, capsys):
    dest = tmp_path / "mine"
    dest.mkdir()
    assert run_cli("cp", "lora_single_device", dest) == 0
    assert (dest / "lora_single_device.py").read_text() == TOY_RECIPE.read_text()
    assert run_cli("cp", "fam/lora", dest / "my_lora") == 0  # the suffix is added
    assert (dest / "my_lora.yaml").read_text() == (builtin / "configs" / "fam" / "lora.yaml").read_text()
    assert run_cli("cp", "fam/lora", tmp_path / "new" / "sub" / "x.yaml") == 0  # parents are created
    assert (tmp_path / "new" / "sub" / "x.yaml").is_file()
    assert run_cli("cp", "fam/lora", f"{tmp_path / 'folder'}/") == 0  # a trailing / means a folder
    assert (tmp_path / "folder" / "lora.yaml").is_file()
    assert "copied fam/lora to" in capsys.readouterr().out


def test_cp_refuses_to_overwrite_unless_forced(builtin, tmp_path, capsys):
    dest = tmp_path / "lora.yaml"
    dest.write_text("mine")
    assert run_cli("cp", "fam/lora", dest) == 2
    assert capsys.readouterr().err == f"tunekit: error: {dest} already exists; pass --force to overwrite it\n"
    assert dest.read_text() == "mine"
    assert run_cli("cp", "--force", "fam/lora", dest) == 0
    assert dest.read_text() != "mine"


def test_cp_unknown_name_suggests(builtin, tmp_path, capsys):
    assert run_cli("cp", "lora_single_devise", tmp_path) == 2
    assert "did you mean lora_single_device?" in capsys.readouterr().err


def test_cat_prints_resolved_config(builtin, capsys):
    assert run_cli("cat", "fam/lora", "steps=7", "output_path=${asset:tiny_llama}") == 0
    out = capsys.readouterr().out
    assert "steps: 7\n" in out
    assert f"output_path: {Path(tunekit.__file__).resolve().parent / 'assets' / 'tiny_llama'}\n" in out


def test_validate_ok_and_problems(builtin, capsys):
    assert run_cli("validate", "fam/lora", "output_path=/tmp/x") == 0
    # lora_distributed declares no CONFIG (a forked recipe can): only lora_single_device's keys are checked
    assert capsys.readouterr().out == "fam/lora: config is valid for lora_single_device\n"
    assert run_cli("validate", "fam/lora", "optimizer.lrr=1") == 2
    err = capsys.readouterr().err
    assert err.startswith("tunekit: error: fam/lora: 2 problems\n")
    assert "  output_path: value is missing (???)" in err
    assert "  optimizer.lrr: no such argument of torch.optim.SGD; did you mean lr?" in err


@pytest.mark.parametrize("argv, message", [
    (["validate", "fam/lorra"], "no built-in config named 'fam/lorra'; did you mean fam/lora?"),
    (["cat", "fam/lora", "stepz=3"], "no key 'stepz' in the config; did you mean steps?"),
    (["cat", "fam/lora", "steps"], "bad override 'steps'"),
    (["run", "lora_single_devic", "--config", "fam/lora"], "did you mean lora_single_device?"),
    (["run", "lora_single_device"], "missing --config"),
    (["run", "--nproc_per_node", "2", "lora_single_device", "--config", "fam/lora"],
     "recipe lora_single_device runs on one device; use lora_distributed for --nproc_per_node 2"),
    (["run", "--nproc_per_nod", "2", "lora_distributed", "--config", "fam/lora"],
     "unknown torchrun option --nproc_per_nod; did you mean --nproc_per_node?"),
    (["run", "./missing.py", "--config", "fam/lora"], "recipe file ./missing.py not found"),
    (["validate", "fam/lora", "output_path=x", "+stepz=3"],
     "stepz: not a key this recipe reads (it would be ignored); did you mean steps?"),
    (["validate", "fam/lora", "output_path=x", "steps=0"], "steps: expected a positive integer, got 0"),
    (["run", "lora_single_device", "--config", "fam/lora", "output_path=x", "batch_size=abc"],
     "batch_size: expected a positive integer, got 'abc'"),
])
def test_user_errors_are_one_line(builtin, capsys, argv, message):
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunekit: error: ") and message in err and len(err.splitlines()) == 1


def test_run_in_process_builtin_name(builtin, tmp_path):
    out = tmp_path / "result.json"
    assert run_cli("run", "lora_single_device", "--config", "fam/lora", f"output_path={out}", "steps=3") == 0
    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and len(result["losses"]) == 3
    assert result["losses"][-1] < result["losses"][0]


def test_run_torchrun_matches_single_process(tmp_path):
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    assert run_cli("run", TOY_RECIPE, "--config", TOY_CONFIG, f"output_path={single}") == 0
    proc = tunekit_subprocess("run", "--nproc_per_node", "2", "--standalone", TOY_DISTRIBUTED,
                              "--config", TOY_CONFIG, f"output_path={multi}")
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert b["world_size"] == 2 and len(b["losses"]) == 5
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["weight"] == pytest.approx(b["weight"], rel=1e-5)


def test_run_torchrun_exit_code_propagates(tmp_path):
    recipe = tmp_path / "fails_distributed.py"  # a forked recipe that fails on every rank
    recipe.write_text("import sys\nsys.exit(3)\n")
    proc = tunekit_subprocess("run", "--nproc-per-node=1", "--standalone", recipe, "--config", TOY_CONFIG,
                              "output_path=x.json")
    assert proc.returncode == 1  # torchrun's code for a failed worker (2 is kept for user errors)
    assert "tunekit: error: fails_distributed.py failed on rank 0 (exit code 3)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_errors_in_a_subprocess_one_line_or_traceback_with_debug():
    proc = tunekit_subprocess("run", TOY_RECIPE, "--config", TOY_CONFIG)
    assert proc.returncode == 2
    assert proc.stderr == (f"tunekit: error: {TOY_CONFIG}: output_path: value is missing (???); "
                           "set it on the command line: output_path=...\n")
    debug = tunekit_subprocess("run", TOY_RECIPE, "--config", TOY_CONFIG, env={"TUNEKIT_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_download_without_huggingface_hub(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.delenv("TUNEKIT_DEBUG", raising=False)
    assert run_cli("download", "org/model", "--output-dir", tmp_path) == 2
    assert capsys.readouterr().err == 'tunekit: error: downloading needs huggingface_hub: pip install "tunekit[hf]"\n'


def test_download_hub_unreachable(tmp_path):
    pytest.importorskip("huggingface_hub")
    # A closed local port stands in for a machine without network.
    proc = tunekit_subprocess("download", "org/model", "--output-dir", tmp_path,
                              env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_XET": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("tunekit: error: the Hugging Face Hub (http://127.0.0.1:9) is unreachable")
    assert len(proc.stderr.splitlines()) == 1


def test_data_check_subcommand_is_registered(capsys):
    assert run_cli("data", "check", "--help") == 0
    assert "usage: tunekit data check" in capsys.readouterr().out
