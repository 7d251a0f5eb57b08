"""What every tunekit tokenizer shares: encode/decode around special tokens and chat tokenization.

A concrete tokenizer only supplies ``_encode_chunk`` (plain text -> ids and character offsets) and
``_decode_chunk``; special tokens are split out here, the same way HF ``tokenizers`` splits added
tokens before running the model, so ``encode`` of a rendered chat equals HF's ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tunekit.data.tokenizers.chat_formats import ChatFormat, Message


class BaseTokenizer:
    """Shared half of the tokenizer contract (see docs/design.md, "Tokenizer contract").

    Subclasses set the attributes below in ``__init__`` and implement ``_encode_chunk`` /
    ``_decode_chunk``. ``added_tokens`` maps every string that is matched as one token wherever it
    appears in text (special or not) to its id; ``special_ids`` are the ones ``decode`` drops when
    ``skip_special_tokens`` is set.
    """

    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_tokens: list[int]
    vocab_size: int

    def __init__(self, *, added_tokens: dict[str, int], special_ids: set[int],
                 bos_id: int | None, eos_id: int, pad_id: int, vocab_size: int,
                 chat_format: ChatFormat | None = None, max_seq_len: int | None = None,
                 normalize: Callable[[str], str] | None = None):
        self.added_tokens = dict(added_tokens)
        self.added_ids = {i: s for s, i in self.added_tokens.items()}
        self.special_ids = set(special_ids)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self._normalize = normalize
        # Longest first: when one added token is a prefix of another, HF matches the longer one.
        names = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, names))) if names else None
        self.set_chat_format(chat_format)

    def set_chat_format(self, chat_format: ChatFormat | None) -> None:
        """Use ``chat_format`` in ``tokenize_messages``; ``stop_tokens`` becomes EOS plus the
        format's end-of-turn tokens."""
        self.chat_format = chat_format
        stops = [self.eos_id] + [self.added_tokens[t] for t in
                                 (chat_format.stop_strings if chat_format else ())
                                 if t in self.added_tokens]
        self.stop_tokens = list(dict.fromkeys(stops))

    # -- to implement -------------------------------------------------------------------------
    def _encode_chunk(self, text: str, at_start: bool,
                      offsets: bool) -> tuple[list[int], list[int] | None]:
        """Ids of ``text`` (no added tokens inside) and, when ``offsets``, each token's start
        character offset in ``text``.

        ``at_start`` is True when the chunk begins the whole input (sentencepiece adds its dummy
        prefix only there, like HF's ``prepend_scheme="first"``).
        """
        raise NotImplementedError

    def _decode_chunk(self, ids: list[int], at_start: bool) -> str:
        raise NotImplementedError

    # -- the contract --------------------------------------------------------------------------
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of ``text`` (added/special tokens written in the text become their id) and the
        start character offset of every id. No BOS/EOS is added."""
        if self._normalize is not None:
            text = self._normalize(text)
        return self._encode_normalized(text, offsets=True)

    def _encode_normalized(self, text: str, offsets: bool) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for m in (self._added_re.finditer(text) if self._added_re else ()):
            self._encode_into(text[pos:m.start()], pos, ids, starts, offsets)
            ids.append(self.added_tokens[m.group()])
            starts.append(m.start())
            pos = m.end()
        self._encode_into(text[pos:], pos, ids, starts, offsets)
        return ids, starts

    def _encode_into(self, chunk: str, pos: int, ids: list[int], starts: list[int],
                     offsets: bool) -> None:
        if not chunk:
            return
        chunk_ids, chunk_starts = self._encode_chunk(chunk, at_start=pos == 0, offsets=offsets)
        ids.extend(chunk_ids)
        if offsets:
            starts.extend(s + pos for s in chunk_starts)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """``text`` -> token ids, with BOS first / EOS last when asked (BOS only if the model has
        one)."""
        if self._normalize is not None:
            text = self._normalize(text)
        ids = self._encode_normalized(text, offsets=False)[0]
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text. Special tokens are dropped when ``skip_special_tokens``; other
        added tokens are always written out."""
        out: list[str] = []
        run: list[int] = []
        first_text = True

        def flush() -> None:
            nonlocal first_text
            if run:
                out.append(self._decode_chunk(run, at_start=first_text))
                run.clear()
                first_text = False

        for i in map(int, ids):
            if i in self.added_ids:
                flush()
                if not (skip_special_tokens and i in self.special_ids):
                    out.append(self.added_ids[i])
                    first_text = False
            else:
                run.append(i)
        flush()
        return "".join(out)

    def tokenize_messages(self, messages: list[Message], add_generation_prompt: bool = False,
                          *, tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
        """Render ``messages`` with the chat format and tokenize them.

        Returns ``(tokens, mask)``, both of length ``n <= max_seq_len``; ``mask[i]`` is True when
        token i is not trained on. A token is trained when the character it starts at belongs to
        assistant content or its end-of-turn marker.
        """
        if self.chat_format is None:
            raise ValueError("this tokenizer has no chat format; pass chat_format= (one of "
                             "llama2, llama3, mistral, chatml, gemma) to from_hf")
        parts = self.chat_format.render(messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, bos=self._token_text(self.bos_id),
                                        eos=self._token_text(self.eos_id))
        if self._normalize is not None:
            parts = [(self._normalize(t), trained) for t, trained in parts]
        text = "".join(t for t, _ in parts)
        char_trained = [trained for t, trained in parts for _ in t]
        ids, starts = self._encode_normalized(text, offsets=True)
        mask = [not char_trained[s] for s in starts]
        if self.max_seq_len is not None:
            ids, mask = ids[:self.max_seq_len], mask[:self.max_seq_len]
        return ids, mask

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.added_ids.get(token_id, "")
