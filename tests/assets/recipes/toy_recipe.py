"""Test recipe: fit a tiny nn.Linear with full-batch SGD and write the losses to cfg.output_path."""

import json
import sys

import torch

import tunekit.config
from tunekit.config.schema import Component, Int, Str

# the keys this recipe reads (tunekit validate / run check configs against it)
CONFIG = {"seed": Int(min=0), "steps": Int(min=1), "batch_size": Int(min=1), "output_path": Str(),
          "model": Component(), "optimizer": Component()}


def make_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: x [batch_size, in_features], y [batch_size, out_features]."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, cfg.model.in_features, generator=g)
    w = torch.randn(cfg.model.in_features, cfg.model.out_features, generator=g)
    return x, x @ w


def train(cfg, x, y, all_reduce_grads=lambda model: None) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(cfg.seed)
    model = tunekit.config.instantiate(cfg.model)
    optimizer = tunekit.config.instantiate(cfg.optimizer, model.parameters())
    losses = []
    for _ in range(cfg.steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        all_reduce_grads(model)
        optimizer.step()
        losses.append(loss.item())
    return model, losses


def write_result(cfg, model, losses, world_size: int) -> None:
    with open(cfg.output_path, "w") as f:
        json.dump({"losses": losses, "weight": model.weight.detach().flatten().tolist(),
                   "world_size": world_size}, f)


def main(cfg) -> None:
    torch.set_num_threads(1)
    model, losses = train(cfg, *make_batch(cfg))
    write_result(cfg, model, losses, world_size=1)


if __name__ == "__main__":
    main(tunekit.config.parse(sys.argv[1:], CONFIG))
