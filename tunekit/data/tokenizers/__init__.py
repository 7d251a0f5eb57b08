"""Tokenizers (sentencepiece, tiktoken, HF tokenizer.json BPE), chat formats and ``from_hf``.

All tokenizers follow the contract in docs/design.md; see docs/tokenizers.md.
"""

from tunekit.data.tokenizers.base import BaseTokenizer
from tunekit.data.tokenizers.chat_formats import (
    CHAT_FORMATS,
    ChatFormat,
    Message,
    get_chat_format,
    guess_chat_format,
)
from tunekit.data.tokenizers.chat_template import TemplateChatFormat
from tunekit.data.tokenizers.hf_checkpoint import from_hf
from tunekit.data.tokenizers.hf_json import (
    HFTokenizersBPE,
    MergeRankBPE,
    load_tokenizer_json,
)
from tunekit.data.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from tunekit.data.tokenizers.tiktoken_tokenizer import (
    LLAMA3_PATTERN,
    TiktokenTokenizer,
    llama3_special_tokens,
    llama3_tokenizer,
    load_tiktoken_ranks,
)

__all__ = [
    "BaseTokenizer", "CHAT_FORMATS", "ChatFormat", "HFTokenizersBPE", "LLAMA3_PATTERN", "MergeRankBPE",
    "Message",
    "SentencePieceTokenizer", "TemplateChatFormat", "TiktokenTokenizer", "from_hf", "get_chat_format",
    "guess_chat_format", "llama3_special_tokens", "llama3_tokenizer", "load_tiktoken_ranks",
    "load_tokenizer_json",
]
