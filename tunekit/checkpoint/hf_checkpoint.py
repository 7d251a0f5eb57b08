"""Read and write Hugging Face checkpoint folders (``config.json`` + safetensors, sharded or not).

Never unpickles code: weights come from safetensors, or from ``pytorch_model*.bin`` through
``torch.load(weights_only=True)``. Every problem with the files (missing, invalid JSON, truncated
or corrupt weights, a pickle ``weights_only`` refuses, NaN/inf weights) is a
:class:`~tunekit.checkpoint.errors.CheckpointError` (or ``NonFiniteError``) naming the file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunekit.checkpoint.errors import CheckpointError, check_finite
from tunekit.checkpoint.hf_keys import UnmappedNameError, from_hf_name, to_hf_name
from tunekit.config.errors import MissingFileError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "original/tokenizer.model")
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

# buffers some older checkpoints saved next to the weights; they are recomputed, never loaded
_IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def read_json_file(path: Path, what: str) -> dict:
    """The JSON object in ``path``; :class:`CheckpointError` naming the file, line and column if it
    is not valid JSON or not an object. ``what`` says what the file is for the message."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              f"fix or replace this {what}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a text file; fix or replace this {what}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}; "
                              f"fix or replace this {what}")
    return value


def read_hf_config(checkpoint_dir: str | Path) -> dict:
    """The parsed ``config.json`` of an HF checkpoint folder."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        what = "does not exist" if not Path(checkpoint_dir).exists() else "has no config.json"
        raise MissingFileError(f"checkpoint_dir={checkpoint_dir} {what}: it must be a Hugging Face model folder "
                               "(config.json + model*.safetensors)")
    return read_json_file(path, "model config")


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of an HF checkpoint folder (from its index when sharded)."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = checkpoint_dir / index_name
        if index.is_file():
            weight_map = read_json_file(index, "checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map' object (tensor name -> file); fix or replace the index")
            return [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
    for single in (SAFETENSORS_FILE, BIN_FILE):
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    raise MissingFileError(f"checkpoint_dir={checkpoint_dir}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} "
                           f"or {BIN_INDEX}: not a Hugging Face model folder with weights")


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one ``*.safetensors`` or ``*.bin`` file (CPU, HF names as stored)."""
    if not path.is_file():
        raise MissingFileError(f"{path} is listed in the checkpoint index but missing; download the checkpoint again")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is truncated or "
                                  "corrupt: download or copy it again") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else "unpickling failed"
        raise CheckpointError(f"{path}: refused: it pickles Python objects besides tensors, which tunekit never "
                              f"loads (weights_only=True: {reason}); use the checkpoint's safetensors files, or "
                              "convert this file to safetensors where you trust it") from None
    except (RuntimeError, EOFError) as e:  # torch.load's reader on a truncated / non-zip file
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({str(e).splitlines()[0][:200]}); "
                              "the file is truncated or corrupt: download or copy it again") from None


def load_hf_state_dict(checkpoint_dir: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All weights of an HF checkpoint folder under tunekit names (on CPU).

    ``dtype`` casts floating-point tensors; None keeps the stored dtypes. A NaN or infinity in
    any weight raises ``NonFiniteError`` naming the tensor and its file.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(checkpoint_dir)):
        tensors = read_weight_file(path)
        check_finite(tensors.items(), str(path), action="loading")
        for hf_name, tensor in tensors.items():
            if hf_name.endswith(_IGNORED_HF_SUFFIXES):
                continue
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            try:
                state_dict[from_hf_name(hf_name)] = tensor
            except UnmappedNameError as e:
                raise CheckpointError(f"{path}: {e}; is this a checkpoint of a supported architecture?") from None
    return state_dict


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_disk_tensors(state_dict: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """HF names, contiguous CPU tensors, no two sharing storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        hf_name = to_hf_name(name)
        if tied and hf_name == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[hf_name] = tensor
    return out


def _shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_hf_checkpoint(state_dict: Mapping[str, torch.Tensor], out_dir: str | Path, *, hf_config: dict,
                       source_dir: str | Path | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write an HF checkpoint folder loadable by ``AutoModelForCausalLM.from_pretrained``.

    Args:
        state_dict: tunekit-named full (unsharded) tensors.
        out_dir: created if needed; previous ``model*.safetensors`` files in it are removed.
        hf_config: the model's ``config.json`` content; its dtype fields are set to the saved dtype.
        source_dir: folder to copy tokenizer / generation config files from (those present).
        max_shard_size: bytes per file; above it, ``model-0000i-of-0000N.safetensors`` + index.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = _to_disk_tensors(state_dict, tied=bool(hf_config.get("tie_word_embeddings", False)))
    if not tensors:
        raise ValueError("save_hf_checkpoint: empty state_dict")
    check_finite(tensors.items(), str(out_dir), action="saving")  # never write a NaN checkpoint
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)

    shards = _shards(tensors, max_shard_size)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SAFETENSORS_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / file_name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file_name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    config = dict(hf_config)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if float_dtypes:
        # several float dtypes (mixed-precision leftovers) -> name the widest, as HF does for "auto"
        dtype = max(float_dtypes, key=lambda d: torch.finfo(d).bits)
        config["dtype"] = _dtype_name(dtype)
        if "torch_dtype" in config:
            config["torch_dtype"] = _dtype_name(dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    if source_dir is not None:
        for rel in TOKENIZER_FILES:
            src = Path(source_dir) / rel
            if src.is_file() and src.resolve() != (out_dir / rel).resolve():
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out_dir / rel)
    return out_dir
