"""The tokenizer must fit the model: every id it can produce needs a row of the embedding."""

from __future__ import annotations

from torch import nn

from tunekit.config.errors import UserError


def embedding_rows(model: nn.Module) -> int:
    """Rows of the model's token embedding (``tok_embeddings``; sharded models report the full size)."""
    embedding = getattr(model, "tok_embeddings", None)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no nn.Embedding tok_embeddings")
    return embedding.num_embeddings


def check_tokenizer_fits(tokenizer, model: nn.Module, *, model_source: str) -> None:
    """Raise ``UserError`` before any work when ``tokenizer`` (``.vocab_size``: its largest id + 1)
    can produce ids the model has no embedding for (training would fail with an IndexError deep in
    the first forward). ``model_source`` names where the model came from. A tokenizer smaller
    than the embedding is fine (vocabularies are padded for speed)."""
    rows = embedding_rows(model)
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} token ids but the model of {model_source} embeds only "
            f"{rows}: they come from different checkpoints; build the tokenizer from the model's own folder "
            "(tokenizer.checkpoint_dir: ${checkpoint_dir})")
