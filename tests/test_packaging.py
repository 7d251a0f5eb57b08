"""A plain (non-editable) install works: the wheel and the sdist carry every recipe, config and demo
asset, and the wheel installed in a fresh virtual environment runs ``tunekit --version``, ``ls``,
``cp``, ``cat`` and a 2-step LoRA fine-tune from a folder outside the checkout.

No network: the build uses the running interpreter's setuptools (``--no-build-isolation``), and the
venv sees torch and the other dependencies through ``--system-site-packages``."""

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import tunekit
from tunekit.cli.main import main

REPO = Path(__file__).resolve().parent.parent

# Not copied for a build: version control, build leftovers, caches and run outputs (see .gitignore).
_NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".venv", "outputs", "runs")


def source_copy(tmp_path: Path) -> Path:
    """The checkout copied to ``tmp_path/src``. setuptools builds in the source folder: a ``build/``
    left in the checkout would carry files deleted since into later wheels, and two test runs
    sharing the checkout would build in the same folder at once."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    return src


def shipped_files(src: Path) -> dict[str, list[str]]:
    """What a distribution of the checkout copy ``src`` must carry, as paths inside the installed
    package (wheel layout). Read from the copy: the checkout may change while the test runs."""
    recipes = src / "recipes"
    return {
        "recipes": sorted(f"tunekit/recipes/{p.name}" for p in recipes.glob("*.py")),
        "configs": sorted(f"tunekit/recipes/{p.relative_to(recipes).as_posix()}"
                          for p in (recipes / "configs").rglob("*.y*ml")),
        "assets": sorted(p.relative_to(src).as_posix() for p in (src / "tunekit" / "assets").rglob("*") if p.is_file()),
        "modules": sorted(p.relative_to(src).as_posix() for p in (src / "tunekit").rglob("*.py")),
    }


def run(cmd, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def clean_env() -> dict[str, str]:
    # PYTHONPATH could put the checkout ahead of the installed package; TUNEKIT_DEBUG=1 makes a
    # failing command print its traceback into the assertion message; one OpenMP thread because
    # the tiny model gains nothing from more and spinning threads stall it on a busy machine.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    return {**env, "TUNEKIT_DEBUG": "1", "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1"}


def test_version_from_metadata_or_from_an_uninstalled_checkout(monkeypatch, capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"tunekit {importlib.metadata.version('tunekit')}\n"

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(tunekit, "__file__", str(REPO / "tunekit" / "__init__.py"))  # also when tested installed
    with open(REPO / "pyproject.toml", "rb") as f:
        assert tunekit._version() == tomllib.load(f)["project"]["version"]


def test_sdist_carries_recipes_configs_and_assets(tmp_path):
    src = source_copy(tmp_path)
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_sdist(sys.argv[1]))")  # the PEP 517 hook `python -m build --sdist` calls
    name = run([sys.executable, "-c", build, tmp_path / "dist"], cwd=src, env=clean_env()).stdout.split()[-1]
    with tarfile.open(tmp_path / "dist" / name) as tar:
        top = name.removesuffix(".tar.gz")
        members = {m.name.removeprefix(f"{top}/") for m in tar.getmembers() if m.isfile()}
    for kind, files in shipped_files(src).items():  # the sdist keeps the source layout: recipes/ at the top
        files = [f.replace("tunekit/recipes/", "recipes/", 1) for f in files]
        assert files and not set(files) - members, f"sdist lacks {kind}: {sorted(set(files) - members)}"
    assert {"pyproject.toml", "setup.py", "README.md"} <= members
    assert not [m for m in members if m.endswith(".pyc") or "__pycache__" in m]


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = clean_env()
    work = tmp_path / "work"  # the working directory of every command: neither the checkout nor the venv
    work.mkdir()

    # Build exactly as `pip wheel .` would, offline.
    src = source_copy(tmp_path)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp_path / "wheelhouse", src], cwd=work, env=env)
    (wheel,) = (tmp_path / "wheelhouse").glob("tunekit-*.whl")
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    expected = shipped_files(src)
    for kind, files in expected.items():
        assert files and not set(files) - names, f"wheel lacks {kind}: {sorted(set(files) - names)}"
    stray = [n for n in names if not n.startswith(("tunekit/", f"tunekit-{version}.dist-info/"))
             or n.endswith(".pyc") or "__pycache__" in n]
    assert not stray, f"wheel carries files that do not belong in it: {stray}"

    # A fresh venv outside the checkout. --without-pip saves the ~8 s of ensurepip: the venv runs
    # the interpreter's own pip, visible (like torch) through --system-site-packages.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=work, env=env)
    py = venv / "bin" / "python"
    purelib = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=work, env=env).stdout.strip())
    if sys.prefix != sys.base_prefix:
        # Running inside a venv: --system-site-packages exposes the base interpreter's packages, not
        # this venv's, where torch is. addsitedir appends them after the new venv's own site-packages
        # and runs their .pth files, as for system site-packages.
        dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
        (purelib / "_outer_site.pth").write_text(f"import site; [site.addsitedir(d) for d in {dirs!r}]\n")
    # --ignore-installed: never look at (or try to uninstall) the tunekit of the system site-packages,
    # typically the editable install of this checkout.
    run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-compile", wheel],
        cwd=work, env=env)

    # The venv imports the installed copy. The system site-packages usually hold the editable
    # install of the checkout, whose .pth puts an import finder for it on sys.meta_path, in the venv
    # too; that finder comes after the path finder, which finds the venv's site-packages first.
    probe = ("import json, sys, tunekit, tunekit.recipes; from tunekit import _paths; "
             "print(json.dumps({'tunekit': tunekit.__file__, 'recipes': tunekit.recipes.__file__, "
             "'recipes_dir': str(_paths.recipes_dir()), 'version': tunekit.__version__, "
             "'editable_finder': any('__editable___tunekit' in repr(f) for f in sys.meta_path)}))")
    seen = json.loads(run([py, "-c", probe], cwd=work, env=env).stdout)
    installed = (purelib / "tunekit").resolve()
    for key in ("tunekit", "recipes", "recipes_dir"):
        assert Path(seen[key]).resolve().is_relative_to(installed), (
            f"{key} imported from {seen[key]}, not from the installed {installed} "
            f"(editable finder on sys.meta_path: {seen['editable_finder']})")
    assert seen["version"] == version
    # When this interpreter has an editable install of tunekit (CI: the README's `pip install -e`),
    # the venv had its finder active and the installed copy still won: the case above is exercised.
    assert seen["editable_finder"] == any("__editable___tunekit" in repr(f) for f in sys.meta_path)

    cli = venv / "bin" / "tunekit"
    assert run([cli, "--version"], cwd=work, env=env).stdout == f"tunekit {version}\n"

    listed = run([cli, "ls"], cwd=work, env=env).stdout.split()
    assert "lora_finetune_single_device" in listed and "tiny/lora" in listed
    assert {Path(f).stem for f in expected["recipes"] if not Path(f).name.startswith("_")} <= set(listed)
    configs = {f.removeprefix("tunekit/recipes/configs/").rsplit(".", 1)[0] for f in expected["configs"]}
    assert configs <= set(listed), f"tunekit ls misses {sorted(configs - set(listed))}"

    run([cli, "cp", "tiny/lora", work / "my_lora.yaml"], cwd=work, env=env)
    assert (work / "my_lora.yaml").read_text() == (src / "recipes" / "configs" / "tiny" / "lora.yaml").read_text()

    resolved = run([cli, "cat", "tiny/lora"], cwd=work, env=env).stdout
    assert f"checkpoint_dir: {installed / 'assets' / 'tiny_llama'}\n" in resolved  # ${asset:...} -> the installed copy

    out = tmp_path / "out"  # batch_size=4: at the config's 16, the 2 steps and 4 evaluations take half the run's time
    run([cli, "run", "lora_finetune_single_device", "--config", "tiny/lora", "max_steps=2", f"output_dir={out}",
         "batch_size=4", "metric_logging.tensorboard=false", "metric_logging.progress_bar=false",
         "eval_every_n_steps=1", "eval_max_batches=1", "save_every_n_steps=2"], cwd=work, env=env)
    assert (out / "step_2" / "model.safetensors").is_file()
    assert (out / "step_2" / "adapter").is_dir() and any((out / "step_2" / "adapter").iterdir())
