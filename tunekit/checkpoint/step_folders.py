"""Step checkpoint folders ``<output_dir>/step_<N>/``, written atomically, and the resume state
(the file format; ``tunekit.training.step_checkpoints.save_step_checkpoint`` runs a save on one
or many processes).

A step folder is first written as ``<output_dir>/.step_<N>.tmp-<pid>``, every file is fsynced,
then the folder is renamed to ``step_<N>``. A crash mid-save therefore leaves at most a tmp
folder (ignored and later removed), never a half ``step_<N>``, and the previous complete
checkpoint stays as it was. ``recipe_state/state.pt`` holds what resume needs besides the
weights (optimizer, lr scheduler, RNG, sampler position, step, epoch) as tensors and primitive
containers only, loaded back with ``torch.load(weights_only=True)`` (the distributed recipes put
DCP shards there instead: ``tunekit.training.resume.save_sharded_training_state``). With
``keep_best`` the best evaluated step folder is exempt from ``keep_last_n`` and named by
``<output_dir>/best`` (a relative symlink) and ``<output_dir>/best.json`` (:func:`link_best`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from tunekit.checkpoint.errors import CheckpointError
from tunekit.config.errors import MissingFileError, UserError

RECIPE_STATE_DIR = "recipe_state"
BEST_LINK = "best"  # <output_dir>/best -> step_<N> (keep_best)
BEST_RECORD = "best.json"
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


def commit_step_folder(tmp: Path, step: int, *, keep_last_n: int | None = None, best: dict | None = None) -> Path:
    """fsync everything in ``tmp`` and rename it to ``step_<step>`` next to it (replacing an older
    folder of the same step only once the new one is complete); then point ``best`` at the best
    step folder (``best``: a :func:`link_best` record, or None) and keep the newest ``keep_last_n``
    step folders plus that best one. Returns the final path."""
    _fsync_tree(tmp)
    out = tmp.parent
    final = out / step_dir_name(step)
    _commit(out, tmp, final, keep_last_n, best)
    return final


def _commit(out: Path, tmp: Path, final: Path, keep_last_n: int | None, best: dict | None = None) -> None:
    old = None
    if final.exists():  # a re-save of the same step (e.g. after resume): swap, then delete the old one
        old = out / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if best is not None:
        link_best(out, best)  # before pruning: the link never points at a folder about to go
    if keep_last_n is not None:
        prune_checkpoints(out, keep_last_n, keep_step=None if best is None else best["step"])


def prune_checkpoints(output_dir: str | os.PathLike, keep_last_n: int, *, keep_step: int | None = None) -> None:
    """Delete all but the newest ``keep_last_n`` (>= 1) complete step folders and ``step_<keep_step>``."""
    if keep_last_n < 1:
        raise ValueError(f"keep_last_n must be >= 1 (or null to keep all), got {keep_last_n}")
    for n, path in list_checkpoints(output_dir)[:-keep_last_n]:
        if n != keep_step:
            shutil.rmtree(path, ignore_errors=True)


def link_best(output_dir: str | os.PathLike, best: dict) -> None:
    """Record the best step folder of ``output_dir``: ``best.json`` (``best``: ``{"step": N,
    "metric": ..., "value": ..., "mode": ...}`` plus ``"folder": "step_<N>"``, for tools that do not
    follow links) and ``best`` -> ``step_<N>`` (a relative symlink, so the folder can be moved or
    copied whole). Each is replaced atomically (written beside, then renamed over the old one):
    a reader sees the old or the new best, never none. Nothing happens while ``step_<N>/`` does not
    exist (a run resumed into another output_dir from a checkpoint whose best folder stayed behind)."""
    out = Path(output_dir)
    target = step_dir_name(best["step"])
    if not (out / target).is_dir():
        return
    link = out / BEST_LINK
    if link.exists() and not link.is_symlink():
        raise CheckpointError(f"{link} exists and is not a link (tunekit points {BEST_LINK} at the best step "
                              "folder); move it away or choose another output_dir")
    record = out / f".{BEST_RECORD}.tmp-{os.getpid()}"
    record.write_text(json.dumps({**best, "folder": target}) + "\n")
    os.replace(record, out / BEST_RECORD)
    if not (link.is_symlink() and os.readlink(link) == target):
        tmp_link = out / f".{BEST_LINK}.tmp-{os.getpid()}"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        os.symlink(target, tmp_link, target_is_directory=True)
        os.replace(tmp_link, link)
    _fsync_dir(out)


def best_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The step folder ``best.json`` names (``keep_best`` runs), or None."""
    record = Path(output_dir) / BEST_RECORD
    if not record.is_file():
        return None
    folder = Path(output_dir) / json.loads(record.read_text())["folder"]
    return folder if folder.is_dir() else None


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
