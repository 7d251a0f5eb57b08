"""What every tunekit tokenizer shares: encode/decode around special tokens and chat tokenization.

A concrete tokenizer only supplies ``_encode_chunk`` (plain text -> ids), ``_encode_chunk_cut``
(the same, plus how many tokens start before given character offsets) and ``_decode_chunk``;
special tokens are split out here, the same way HF ``tokenizers`` splits added tokens before
running the model, so ``encode`` of a rendered chat equals HF's ids.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice

from tunekit.data.tokenizers.chat_formats import ChatFormat, Message


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, the longest one where several match at a position (as
    HF matches added tokens). Written as a trie: Python's ``re`` tries the alternatives of a flat
    ``a|b|c`` one by one at every position, which for Llama 3's 256 special tokens costs more
    than the BPE itself."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        alts = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer word first
    return pattern(trie)


def count_tokens_before(token_ends: Iterator[int], cuts: list[int]) -> list[int]:
    """For each offset in ``cuts`` (increasing, > 0), the number of tokens that start before it.

    ``token_ends``: running end offsets of every token but the last (token ``i`` starts where
    token ``i - 1`` ends, token 0 at 0), consumed only as far as needed: in chat templates the
    cut is often a header a few tokens into a long chunk.
    """
    ends = list(islice(token_ends, 16))
    if len(ends) == 16 and ends[-1] < cuts[-1]:
        ends += token_ends
    return [bisect_left(ends, cut) + 1 for cut in cuts]


class BaseTokenizer:
    """Shared half of the tokenizer contract (see docs/design.md, "Tokenizer contract").

    Subclasses set the attributes below in ``__init__`` and implement ``_encode_chunk``,
    ``_encode_chunk_cut`` and ``_decode_chunk``. ``added_tokens`` maps every string that is
    matched as one token wherever it appears in text (special or not) to its id;
    ``special_ids`` are the ones ``decode`` drops when ``skip_special_tokens`` is set.
    """

    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_tokens: list[int]
    vocab_size: int
    # What HF's tokenizer(text) adds (tokenizer_config's add_bos_token / add_eos_token or the
    # tokenizer.json post-processor; set by from_hf). Without BOS here, encode never adds one.
    add_bos_token: bool = True
    add_eos_token: bool = False

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
        self._added_re = (re.compile(f"({_trie_pattern(self.added_tokens)})")
                          if self.added_tokens else None)
        self.set_chat_format(chat_format)

    def set_chat_format(self, chat_format: ChatFormat | None) -> None:
        """Use ``chat_format`` in ``tokenize_messages``; ``stop_tokens`` becomes EOS plus the
        format's end-of-turn tokens."""
        self.chat_format = chat_format
        stops = [self.eos_id] + [self.added_tokens[t] for t in
                                 (chat_format.stop_strings if chat_format else ())
                                 if t in self.added_tokens]
        self.stop_tokens = list(dict.fromkeys(stops))

    def _added_split(self, text: str) -> list[str]:
        """``[text, added token, text, added token, ..., text]`` (texts may be empty)."""
        return self._added_re.split(text) if self._added_re is not None else [text]

    # -- to implement -------------------------------------------------------------------------
    def _encode_chunk(self, text: str, at_start: bool) -> list[int]:
        """Ids of ``text`` (no added tokens inside).

        ``at_start`` is True when the chunk begins the whole input (sentencepiece adds its dummy
        prefix only there, like HF's ``prepend_scheme="first"``).
        """
        raise NotImplementedError

    def _encode_chunk_cut(self, text: str, at_start: bool,
                          cuts: list[int]) -> tuple[list[int], list[int]]:
        """``_encode_chunk(text, at_start)`` and, for each character offset in ``cuts``
        (increasing, inside ``text``), the number of tokens that start before it.

        A token "starts" at the character holding its first byte, so a token that straddles a
        cut belongs to the side where it begins.
        """
        raise NotImplementedError

    def _decode_chunk(self, ids: list[int], at_start: bool) -> str:
        raise NotImplementedError

    # -- the contract --------------------------------------------------------------------------
    def _encode_normalized(self, text: str) -> list[int]:
        ids: list[int] = []
        added = self.added_tokens
        for k, piece in enumerate(self._added_split(text)):
            if k & 1:
                ids.append(added[piece])
            elif piece:
                ids += self._encode_chunk(piece, k == 0)
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool | None = None) -> list[int]:
        """``text`` -> token ids.

        ``add_bos``: BOS first if this tokenizer adds one (``add_bos_token``: Llama, Mistral,
        Gemma yes; Qwen has no BOS; GPT-2 style files do not add theirs); False: never.
        ``add_eos``: True / False: EOS last or not (training documents end with it, prompts do
        not); None: as ``add_eos_token``. The defaults give HF's ``tokenizer(text).input_ids``.
        """
        if self._normalize is not None:
            text = self._normalize(text)
        ids = self._encode_normalized(text)
        if add_bos and self.add_bos_token and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.add_eos_token if add_eos is None else add_eos:
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
        ids, mask = self._encode_parts(parts)
        if self.max_seq_len is not None:
            ids, mask = ids[:self.max_seq_len], mask[:self.max_seq_len]
        return ids, mask

    def _encode_parts(self, parts: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        """Encode the joined text of ``parts`` exactly like ``encode`` and mask (True) every token
        that starts in an untrained part.

        Offsets are only computed for the few chunks (text between added tokens) in which the
        trained flag changes; the other chunks get one flag for all their tokens. This keeps the
        per-token Python work to list extends, which is what makes chat tokenization fast.
        """
        # Runs of equal flag: run r covers text[starts[r]:starts[r + 1]], masked iff masked[r].
        starts: list[int] = []
        masked: list[bool] = []
        pos = 0
        for t, trained in parts:
            if t and (not masked or masked[-1] == trained):
                starts.append(pos)
                masked.append(not trained)
            pos += len(t)
        starts.append(pos)
        ids: list[int] = []
        mask: list[bool] = []
        added = self.added_tokens
        run = pos = 0
        for k, piece in enumerate(self._added_split("".join(t for t, _ in parts))):
            if not piece:
                continue
            end = pos + len(piece)
            while starts[run + 1] <= pos:
                run += 1
            if k & 1:
                ids.append(added[piece])
                mask.append(masked[run])
            elif starts[run + 1] >= end:  # the chunk lies in one run
                chunk_ids = self._encode_chunk(piece, k == 0)
                ids += chunk_ids
                mask += [masked[run]] * len(chunk_ids)
            else:
                last = run
                while starts[last + 1] < end:
                    last += 1
                chunk_ids, counts = self._encode_chunk_cut(
                    piece, k == 0, [starts[r] - pos for r in range(run + 1, last + 1)])
                ids += chunk_ids
                done = 0
                for r, count in enumerate([*counts, len(chunk_ids)], run):
                    mask += [masked[r]] * (count - done)
                    done = count
            pos = end
        return ids, mask

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.added_ids.get(token_id, "")
