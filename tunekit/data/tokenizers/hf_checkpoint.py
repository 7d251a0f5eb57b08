"""``from_hf``: build the right tokenizer from the files of an HF checkpoint folder.

Which file is used:

1. ``tokenizer.model`` that is a sentencepiece model -> :class:`SentencePieceTokenizer`
   (Llama 2, Mistral, Gemma; HF also builds these from the sentencepiece model).
2. else ``tokenizer.json`` (byte-level BPE) -> tiktoken-backed BPE (Qwen2/2.5/3, Llama 3, ...).
3. else a tiktoken file at ``original/tokenizer.model`` or ``tokenizer.model`` -> Llama 3.

``tokenizer_config.json`` supplies bos/eos/pad tokens, added tokens (``added_tokens_decoder``),
``legacy`` (sentencepiece: dummy prefix after special tokens too) and the ``chat_template`` used
to pick the chat format when none is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.hf_checkpoint import read_json_file
from tunekit.config.errors import MissingFileError
from tunekit.data.tokenizers.base import BaseTokenizer
from tunekit.data.tokenizers.chat_formats import get_chat_format, guess_chat_format
from tunekit.data.tokenizers.hf_json import load_tokenizer_json
from tunekit.data.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from tunekit.data.tokenizers.tiktoken_tokenizer import llama3_tokenizer


def _token_str(value: Any, path: Path, key: str) -> str | None:
    """A token entry of tokenizer_config.json: a string, ``{"content": ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{path}: key {key!r} must be a token string or {{\"content\": ...}}")


def _chat_template(config: dict[str, Any], folder: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _is_sentencepiece(path: Path) -> bool:
    # tiktoken files are ASCII lines "<base64> <rank>"; sentencepiece protos are binary.
    head = path.read_bytes()[:256]
    try:
        first = head.decode("ascii").split("\n", 1)[0].split()
        return not (len(first) == 2 and first[1].isdigit())
    except UnicodeDecodeError:
        return True


def _pick_file(folder: Path) -> tuple[str, Path]:
    """(kind, path) of the tokenizer file to load, in the order of the module docstring."""
    top = folder / "tokenizer.model"
    if top.is_file() and _is_sentencepiece(top):
        return "sentencepiece", top
    if (folder / "tokenizer.json").is_file():
        return "tokenizer.json", folder / "tokenizer.json"
    for path in (folder / "original" / "tokenizer.model", top):
        if path.is_file():
            return "tiktoken", path
    raise CheckpointError(f"{folder}: no tokenizer.model, tokenizer.json or original/tokenizer.model "
                          "found")


def from_hf(checkpoint_dir: str | Path, chat_format: str | None = None,
            max_seq_len: int | None = None) -> BaseTokenizer:
    """Tokenizer of an HF checkpoint folder (see the module docstring for the file choice).

    ``chat_format`` names a format of ``tunekit.data.tokenizers.CHAT_FORMATS``; None guesses it
    from ``chat_template`` in tokenizer_config.json. ``max_seq_len`` truncates
    ``tokenize_messages`` output.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise MissingFileError(f"tokenizer checkpoint_dir={folder} does not exist")
    config_path = folder / "tokenizer_config.json"
    config = read_json_file(config_path, "tokenizer config") if config_path.is_file() else {}
    bos = _token_str(config.get("bos_token"), config_path, "bos_token")
    eos = _token_str(config.get("eos_token"), config_path, "eos_token")
    pad = _token_str(config.get("pad_token"), config_path, "pad_token")
    added: dict[str, tuple[int, bool]] = {}
    for idx, tok in (config.get("added_tokens_decoder") or {}).items():
        try:
            added[tok["content"]] = (int(idx), bool(tok.get("special", False)))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{config_path}: added_tokens_decoder[{idx!r}] needs an integer id "
                                  "and a 'content' string") from None

    kind, path = _pick_file(folder)
    if kind == "sentencepiece":
        # An absent "legacy" means False, as in transformers 5's LlamaTokenizer.
        legacy = config.get("legacy", False)
        if not isinstance(legacy, bool):
            raise CheckpointError(f"{config_path}: key 'legacy' must be true or false, got {legacy!r}")
        tok: BaseTokenizer = SentencePieceTokenizer(path, added_tokens=added, bos_token=bos,
                                                    eos_token=eos, pad_token=pad, legacy=legacy)
    elif kind == "tokenizer.json":
        if eos is None:
            raise CheckpointError(f"{config_path}: eos_token is missing; it is needed with "
                                  "tokenizer.json")
        tok = load_tokenizer_json(path, bos_token=bos, eos_token=eos, pad_token=pad,
                                  extra_added_tokens=added)
    else:
        names = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad))
                 if v is not None}
        tok = llama3_tokenizer(path, **names)

    name = chat_format or guess_chat_format(_chat_template(config, folder), tok.added_tokens)
    tok.max_seq_len = max_seq_len
    if name is not None:
        tok.set_chat_format(get_chat_format(name))
    return tok
