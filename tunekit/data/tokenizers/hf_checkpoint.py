"""``from_hf``: build the right tokenizer from the files of an HF checkpoint folder.

Which file is used:

1. ``tokenizer.model`` that is a sentencepiece model -> :class:`SentencePieceTokenizer`
   (Llama 2, Mistral, Gemma; HF also builds these from the sentencepiece model).
2. else ``tokenizer.json`` (byte-level BPE) -> tiktoken-backed BPE (Qwen2/2.5/3, Llama 3, ...).
3. else a tiktoken file at ``original/tokenizer.model`` or ``tokenizer.model`` -> Llama 3.

``tokenizer_config.json`` supplies bos/eos/pad tokens, added tokens (``added_tokens_decoder``),
``legacy`` (sentencepiece: dummy prefix after special tokens too), ``add_bos_token`` /
``add_eos_token`` (what ``encode`` adds by default, see ``_adds_bos_eos``); the checkpoint's chat template
(``chat_template.jinja``, tokenizer_config.json's ``chat_template`` or ``chat_template.json``)
gives the chat format (see ``tunekit.data.tokenizers.chat_template``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.hf_checkpoint import read_json_file
from tunekit.config.errors import MissingFileError
from tunekit.data.tokenizers.base import BaseTokenizer
from tunekit.data.tokenizers.chat_template import (
    SPECIAL_TOKEN_NAMES,
    choose_chat_format,
    load_chat_template,
)
from tunekit.data.tokenizers.hf_json import load_tokenizer_json, post_processor_tokens
from tunekit.data.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from tunekit.data.tokenizers.tiktoken_tokenizer import llama3_tokenizer


def _token_str(value: Any, path: Path, key: str) -> str | None:
    """A token entry of tokenizer_config.json: a string, ``{"content": ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{path}: key {key!r} must be a token string or {{\"content\": ...}}")


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


def _adds_bos_eos(config: dict[str, Any], config_path: Path, folder: Path, kind: str,
                  tok: BaseTokenizer) -> tuple[bool, bool]:
    """Whether HF's ``tokenizer(text)`` adds BOS / EOS, decided as transformers 5 does: with a
    tokenizer.json, its post-processor alone (transformers then drops tokenizer_config's
    ``add_bos_token`` / ``add_eos_token``; Llama 2/3 and Mistral files add BOS, Qwen and GPT-2
    nothing); without one, those two keys (missing: false; a bare Llama 3 tiktoken file: BOS)."""
    if kind == "tokenizer.json":
        return tok.add_bos_token, tok.add_eos_token  # load_tokenizer_json read the post-processor
    if (folder / "tokenizer.json").is_file():
        spec = read_json_file(folder / "tokenizer.json", "tokenizer.json")
        before, after = post_processor_tokens(spec.get("post_processor"),
                                              str(folder / "tokenizer.json"))
        return bool(before), bool(after)
    flags = []
    for key, default in (("add_bos_token", kind == "tiktoken"), ("add_eos_token", False)):
        value = config.get(key, default)
        if not isinstance(value, bool):
            raise CheckpointError(f"{config_path}: key {key!r} must be true or false, got {value!r}")
        flags.append(value)
    return flags[0], flags[1]


def from_hf(checkpoint_dir: str | Path, chat_format: str | None = "auto",
            max_seq_len: int | None = None,
            chat_template_kwargs: dict[str, Any] | None = None) -> BaseTokenizer:
    """Tokenizer of an HF checkpoint folder (see the module docstring for the file choice).

    ``chat_format``: a format of ``tunekit.data.tokenizers.CHAT_FORMATS``; ``"template"``: the
    checkpoint's own Jinja chat template; ``"auto"`` (or None): the Python format when it gives
    the template's ids on probe conversations, else the template (the choice is logged).
    ``chat_template_kwargs``: extra template variables (``enable_thinking``, ``date_string``).
    ``max_seq_len`` truncates ``tokenize_messages`` output.
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
    tok.add_bos_token, tok.add_eos_token = _adds_bos_eos(config, config_path, folder, kind, tok)

    tok.max_seq_len = max_seq_len
    special = {k: _token_str(config.get(k), config_path, k) for k in SPECIAL_TOKEN_NAMES}
    special = {k: v for k, v in special.items() if v is not None}
    for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if key not in special and tok._token_text(token_id):  # e.g. a bare tiktoken folder
            special[key] = tok._token_text(token_id)
    fmt = choose_chat_format(chat_format, load_chat_template(folder, config), tok, special,
                             chat_template_kwargs)
    if fmt is not None:
        tok.set_chat_format(fmt)
    return tok
