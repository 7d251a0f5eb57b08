"""Choosing which parameters train: partial fine-tuning of the last decoder layers."""

from __future__ import annotations

from torch import nn


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad=True`` by name (pass ``.values()`` to the optimizer)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def freeze_layers(model: nn.Module, train_last_n: int) -> nn.Module:
    """Train only the last ``train_last_n`` decoder layers of ``model.layers`` plus the final
    ``norm`` and an untied ``output`` projection; freeze everything else (embeddings included).

    A tied output (absent ``output``, or one sharing ``tok_embeddings.weight``) stays frozen:
    training it would also change the input embeddings. In place; returns ``model``.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("freeze_layers: the model has no `layers` ModuleList of decoder layers")
    if not isinstance(train_last_n, int) or not 0 <= train_last_n <= len(layers):
        raise ValueError(f"freeze_layers: train_last_n must be an integer in [0, {len(layers)}] "
                         f"(the model has {len(layers)} layers), got {train_last_n!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    trained = list(layers[len(layers) - train_last_n:])
    if getattr(model, "norm", None) is not None:
        trained.append(model.norm)
    output = getattr(model, "output", None)
    if isinstance(output, nn.Module):
        embedding = getattr(getattr(model, "tok_embeddings", None), "weight", None)
        if all(p is not embedding for p in output.parameters()):
            trained.append(output)
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)
    return model
