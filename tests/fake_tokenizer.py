"""A tiny deterministic tokenizer implementing the Tokenizer contract (docs/design.md) for data tests.

Byte-level: ids 0..255 are UTF-8 bytes, then specials. A message is ``<role> content <eot>``;
everything except assistant content and its ``<eot>`` is masked (True = not trained on).
"""

from __future__ import annotations

ROLE_IDS = {"system": 259, "user": 260, "assistant": 261, "tool": 262}


class ByteTokenizer:
    bos_id, eos_id, pad_id, eot_id = 256, 257, 258, 263
    vocab_size = 264

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eos_id, self.eot_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend(f"<{i}>".encode())
        return out.decode("utf-8", errors="replace")

    def tokenize_messages(self, messages, add_generation_prompt: bool = False):
        tokens, mask = [self.bos_id], [True]
        for msg in messages:
            content = list(msg["content"].encode("utf-8"))
            trained = msg["role"] == "assistant"
            tokens += [ROLE_IDS[msg["role"]]] + content + [self.eot_id]
            mask += [True] + [not trained] * (len(content) + 1)
        if add_generation_prompt:
            tokens.append(ROLE_IDS["assistant"])
            mask.append(True)
        return tokens, mask
