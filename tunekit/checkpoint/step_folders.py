"""Step checkpoint folders ``<output_dir>/step_<N>/``, written atomically, and the resume state
(the file format; ``tunekit.training.step_checkpoints.save_step_checkpoint`` runs a save on one
or many processes).

A step folder is first written as ``<output_dir>/.step_<N>.tmp-<pid>``, every file is fsynced,
then the folder is renamed to ``step_<N>``. A crash mid-save therefore leaves at most a tmp
folder (ignored and later removed), never a half ``step_<N>``, and the previous complete
checkpoint stays as it was. ``recipe_state/state.pt`` holds what resume needs besides the
weights (optimizer, lr scheduler, RNG, sampler position, step, epoch) as tensors and primitive
containers only, loaded back with ``torch.load(weights_only=True)`` (the distributed recipes put
DCP shards there instead: ``tunekit.training.resume.save_sharded_training_state``).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from tunekit.checkpoint.errors import CheckpointError
from tunekit.config.errors import MissingFileError, UserError

RECIPE_STATE_DIR = "recipe_state"
_STATE_FILE = "state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.step_(\d+)\.(?:tmp|old)-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened for fsync on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(output_dir: str | os.PathLike) -> None:
    """Delete tmp folders left by saves of processes that no longer run."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    for child in out.iterdir():
        m = _TMP_RE.match(child.name)
        if m and child.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(child, ignore_errors=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step folders as (step, path), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in out.iterdir()
             if (m := _STEP_RE.match(child.name)) and child.is_dir()]
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``step_<N>`` folder under ``output_dir`` (tmp folders ignored), or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def new_tmp_folder(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh, empty ``<output_dir>/.step_<step>.tmp-<pid>/`` to write a step folder into
    (stale tmp folders of dead processes are removed first)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    tmp = out / f".{step_dir_name(step)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_step_folder(tmp: Path, step: int, *, keep_last_n: int | None = None) -> Path:
    """fsync everything in ``tmp`` and rename it to ``step_<step>`` next to it (replacing an older
    folder of the same step only once the new one is complete); then keep the newest
    ``keep_last_n`` step folders. Returns the final path."""
    _fsync_tree(tmp)
    out = tmp.parent
    final = out / step_dir_name(step)
    _commit(out, tmp, final, keep_last_n)
    return final


def _commit(out: Path, tmp: Path, final: Path, keep_last_n: int | None) -> None:
    old = None
    if final.exists():  # a re-save of the same step (e.g. after resume): swap, then delete the old one
        old = out / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last_n is not None:
        prune_checkpoints(out, keep_last_n)


def prune_checkpoints(output_dir: str | os.PathLike, keep_last_n: int) -> None:
    """Delete all but the newest ``keep_last_n`` (>= 1) complete step folders."""
    if keep_last_n < 1:
        raise ValueError(f"keep_last_n must be >= 1 (or null to keep all), got {keep_last_n}")
    for _, path in list_checkpoints(output_dir)[:-keep_last_n]:
        shutil.rmtree(path, ignore_errors=True)


def save_recipe_state(checkpoint_dir: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors and primitive containers only) to ``<checkpoint_dir>/recipe_state/``."""
    folder = Path(checkpoint_dir) / RECIPE_STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / _STATE_FILE)


def load_recipe_state(checkpoint_dir: str | os.PathLike) -> dict:
    """Read what :func:`save_recipe_state` wrote (``weights_only=True``: no code is unpickled)."""
    path = Path(checkpoint_dir) / RECIPE_STATE_DIR / _STATE_FILE
    if not path.is_file():
        raise MissingFileError(f"{path}: no recipe state in this checkpoint; it cannot be resumed "
                               f"({resume_hint(checkpoint_dir)})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # torch.load's errors for a damaged file
        raise CheckpointError(f"{path}: the recipe state of {Path(checkpoint_dir).name} is unreadable "
                              f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}); "
                              f"{resume_hint(checkpoint_dir)}") from None


def resume_hint(step_dir: str | os.PathLike) -> str:
    """How to go on when ``step_dir`` cannot be resumed: the previous complete step folder, if any."""
    step_dir = Path(step_dir)
    earlier = [p for n, p in list_checkpoints(step_dir.parent) if p.name != step_dir.name
               and (m := _STEP_RE.match(step_dir.name)) and n < int(m.group(1))]
    if earlier:
        return f"resume from the previous step with resume_from={earlier[-1]}"
    return "start without resume=true, or pick another output_dir"


def checkpoint_to_resume(output_dir: str | os.PathLike, resume: bool, resume_from: str | os.PathLike | None = None
                         ) -> Path | None:
    """The step folder a run continues from: ``resume_from`` when given (a ``step_<N>/`` folder),
    else with ``resume`` the newest complete one in ``output_dir`` (None if there is none yet:
    a fresh start), None otherwise. A fresh run refuses an ``output_dir`` that already holds
    checkpoints rather than mixing two runs in one folder."""
    if resume_from is not None:
        folder = Path(resume_from)
        if not folder.is_dir():
            raise MissingFileError(f"resume_from={resume_from} does not exist; pass a step_<N>/ folder")
        if not (folder / RECIPE_STATE_DIR).is_dir():
            raise CheckpointError(f"resume_from={resume_from} has no {RECIPE_STATE_DIR}/: not a step folder "
                                  "written by a tunekit training recipe")
        return folder
    latest = find_latest_checkpoint(output_dir)
    if resume or latest is None:
        return latest
    raise UserError(f"output_dir={output_dir} already holds checkpoints (newest: {latest.name}); pass resume=true "
                     "to continue that run, or choose another output_dir")


def find_model_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """``checkpoint_dir`` itself when it is a Hugging Face model folder (has ``config.json``), or
    the newest complete ``step_<N>/`` when it is a training ``output_dir``."""
    path = Path(checkpoint_dir)
    if (path / "config.json").is_file():
        return path
    latest = find_latest_checkpoint(path)
    if latest is not None:
        return latest
    what = "does not exist" if not path.exists() else "has no config.json and no step_<N>/ folders"
    raise MissingFileError(f"checkpoint_dir={path} {what}; point it at a Hugging Face model folder or at a "
                           "training output_dir holding step_<N>/ checkpoints")
