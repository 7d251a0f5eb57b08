"""Test recipe: toy_recipe data-parallel over gloo ranks (each rank takes a slice of the batch,
gradients are averaged with all_reduce); rank 0 writes the result. Equals toy_recipe exactly
when batch_size divides by the world size."""

import sys

import torch
import torch.distributed as dist

import tunekit.config
from tunekit.training.process_group import exit_after_clean_run
from toy_recipe import CONFIG, make_batch, train, write_result  # the folder of the recipe is on sys.path


def average_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def main(cfg) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = make_batch(cfg)
    shard = cfg.batch_size // world
    mine = slice(rank * shard, (rank + 1) * shard)
    model, losses = train(cfg, x[mine], y[mine], average_grads)
    # The logged loss is the global-batch mean, as in the single-process run.
    loss = torch.tensor(losses)
    dist.all_reduce(loss)
    if rank == 0:
        write_result(cfg, model, (loss / world).tolist(), world_size=world)
    dist.barrier()  # no rank tears gloo down while another is still using it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(tunekit.config.parse(sys.argv[1:], CONFIG))
    exit_after_clean_run()
