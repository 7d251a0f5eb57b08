"""What the preference-tuning recipes need besides the loss itself: per-completion log-probs of a
preference batch (docs/design.md, "Preference batch") for the policy and the reference, the
reference log-probs computed once before training and cached on disk, the objective of a batch for
the configured loss (the DPO family, SimPO/CPO/ORPO, KTO), and the step's metrics under TRL's names
(``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen``, ``logits/chosen``, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.checkpoint.errors import CheckpointError
from tunekit.config.errors import UserError
from tunekit.losses.preference import (
    KTO_LOSS_TYPES,
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    PreferenceLogps,
    check_preference_loss_args,
    kto_kl_estimate,
    kto_loss,
    kto_metric_sums,
    metric_means,
    preference_loss,
    preference_metric_sums,
)
from tunekit.modules.peft import adapters_disabled
from tunekit.training.process_group import (
    broadcast_from_rank0,
    get_world_size_and_rank,
    is_distributed,
    log_rank_zero,
    sum_over_ranks,
)
from tunekit.training.train_step import move_batch

log = logging.getLogger("tunekit.training.preference")

LOSS_TYPES = PREFERENCE_LOSS_TYPES + KTO_LOSS_TYPES


# -- the loss configuration --------------------------------------------------------------------

def loss_names(loss_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``loss.loss_type`` of a config as a tuple of names."""
    loss_type = loss_cfg["loss_type"]
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def is_kto(loss_cfg: Mapping[str, Any]) -> bool:
    return any(name in KTO_LOSS_TYPES for name in loss_names(loss_cfg))


def needs_reference(loss_cfg: Mapping[str, Any]) -> bool:
    """False for the reference-free losses (SimPO, CPO, ORPO): no reference forward at all."""
    return not all(name in REFERENCE_FREE_LOSS_TYPES for name in loss_names(loss_cfg))


def loss_config_problem(loss_cfg: Mapping[str, Any]) -> str | None:
    """Why the config's ``loss`` section cannot work (None when it can): the check behind the
    schema entry of the recipes' ``loss`` section."""
    names = loss_names(loss_cfg)
    if any(n in KTO_LOSS_TYPES for n in names):
        if len(names) != 1:
            return f"KTO losses ({', '.join(KTO_LOSS_TYPES)}) cannot be combined with others; got {list(names)}"
        return None
    try:
        check_preference_loss_args(loss_cfg["loss_type"], loss_cfg["loss_weights"], beta=loss_cfg["beta"],
                                   label_smoothing=loss_cfg["label_smoothing"],
                                   f_divergence_type=loss_cfg["f_divergence_type"],
                                   discopop_tau=loss_cfg["discopop_tau"])
    except UserError as e:
        return str(e)
    return None


# -- per-completion log-probs --------------------------------------------------------------------

@dataclass
class SequenceLogps:
    """Per-completion sums over the completion's target tokens, [K] each (K = 2 x pairs):
    ``logps`` (sum of token log-probs, with gradient for the policy), ``tokens`` (how many
    targets) and ``logit_sums`` (sum over the tokens of the mean logit over the vocabulary; no
    gradient: TRL's ``logits/*`` metrics)."""

    logps: torch.Tensor
    tokens: torch.Tensor
    logit_sums: torch.Tensor


def sequence_sums(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """values [R, S] -> per-sequence sums [num_sequences] over the positions with sequence_ids >= 0."""
    keep = sequence_ids >= 0
    return values.new_zeros(num_sequences).index_add(0, sequence_ids[keep], values[keep])


def sequence_logps(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> SequenceLogps:
    """The completions' log-probs under ``model`` for a preference batch: one forward over all
    rows (chosen and rejected together), the output projection fused (no [R, S, vocab] logits)."""
    log_probs, logit_means = model(batch["tokens"], labels=batch["labels"], mask=batch.get("mask"),
                                   input_pos=batch.get("input_pos"), per_token=True)
    k = 2 * int(batch["num_pairs"])
    ids = batch["sequence_ids"]
    tokens = sequence_sums(torch.ones_like(log_probs), ids, k)
    return SequenceLogps(sequence_sums(log_probs, ids, k), tokens, sequence_sums(logit_means, ids, k))


@torch.no_grad()
def reference_logps(batch: Mapping[str, torch.Tensor], *, policy: nn.Module | None = None,
                    reference: nn.Module | None = None) -> torch.Tensor:
    """The reference's per-completion log-probs [2P] (no gradient), in this order of sources: the
    batch's precomputed ``ref_logps``; ``reference`` (a frozen model, full fine-tuning); ``policy``
    with its LoRA adapters switched off (the base model: no second copy of the weights)."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if reference is not None:
        return sequence_logps(reference, batch).logps
    if policy is None:
        raise ValueError("reference_logps: give the policy (LoRA), a reference model or precomputed ref_logps")
    was_training = policy.training
    policy.eval()  # no adapter dropout in the reference (its adapters are off anyway)
    try:
        with adapters_disabled(policy):
            return sequence_logps(policy, batch).logps
    finally:
        policy.train(was_training)


# -- the objective -----------------------------------------------------------------------------

@dataclass
class Objective:
    """One batch's losses and what the metrics read. ``losses`` [P] per pair (KTO: per example);
    ``chosen_rewards`` / ``rejected_rewards`` [P] (KTO: the rewards of the desirable / undesirable
    examples; None for a loss without rewards); ``kl`` the KTO KL estimate (else None)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None
    kl: torch.Tensor | None = None


def preference_objective(loss_cfg: Mapping[str, Any], batch: Mapping[str, torch.Tensor], policy: SequenceLogps,
                         reference: torch.Tensor | None, *, mean_chosen_tokens: float | None = None) -> Objective:
    """The configured loss of a preference batch from the per-completion log-probs (policy [2P]
    with gradient, reference [2P] or None for reference-free losses). KTO's KL estimate is averaged
    over ranks (one all-reduce), as TRL gathers it, so every rank shifts by the same baseline.
    ``mean_chosen_tokens``: the NLL terms' normaliser (``sft``, ``cpo``, ``orpo``: TRL takes the
    token mean over the batch); the recipes pass the mean over the whole step and all ranks, so
    that gradient accumulation and N processes give the single-device loss (None: this batch's)."""
    chosen, rejected = slice(0, None, 2), slice(1, None, 2)
    if is_kto(loss_cfg):
        kl = kto_kl_estimate(policy.logps[rejected].detach(), reference[rejected])
        if is_distributed():
            (total,) = sum_over_ranks(float(kl))
            kl = kl.new_tensor(total / get_world_size_and_rank()[0])
        out = kto_loss(policy.logps[chosen], reference[chosen], batch["desirable"], beta=loss_cfg["beta"],
                       kl=kl, desirable_weight=loss_cfg["desirable_weight"],
                       undesirable_weight=loss_cfg["undesirable_weight"], loss_type=loss_names(loss_cfg)[0])
        desirable = batch["desirable"]
        return Objective(out.losses, out.rewards[desirable], out.rewards[~desirable], kl)
    logps = PreferenceLogps(
        policy_chosen=policy.logps[chosen], policy_rejected=policy.logps[rejected],
        ref_chosen=None if reference is None else reference[chosen],
        ref_rejected=None if reference is None else reference[rejected],
        chosen_tokens=policy.tokens[chosen], rejected_tokens=policy.tokens[rejected])
    out = preference_loss(
        loss_cfg["loss_type"], logps, beta=loss_cfg["beta"], loss_weights=loss_cfg["loss_weights"],
        label_smoothing=loss_cfg["label_smoothing"], f_divergence_type=loss_cfg["f_divergence_type"],
        f_alpha_divergence_coef=loss_cfg["f_alpha_divergence_coef"], discopop_tau=loss_cfg["discopop_tau"],
        simpo_gamma=loss_cfg["simpo_gamma"], cpo_alpha=loss_cfg["cpo_alpha"], mean_chosen_tokens=mean_chosen_tokens)
    return Objective(out.losses, out.chosen_rewards, out.rejected_rewards)


def mean_chosen_tokens(micro_batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Chosen-completion target tokens per pair over a step's micro-batches and every rank: the
    step-wide normaliser of the NLL terms (see :func:`preference_objective`). Collective."""
    tokens = pairs = 0
    for b in micro_batches:
        ids = b["sequence_ids"]
        tokens += int(((ids >= 0) & (ids % 2 == 0)).sum())
        pairs += int(b["num_pairs"])
    tokens, pairs = sum_over_ranks(tokens, pairs)
    return tokens / max(pairs, 1)


# -- metrics -----------------------------------------------------------------------------------

class PreferenceMetrics:
    """Sums over a step's (or an evaluation's) micro-batches, summed over ranks by :meth:`means`,
    reported under TRL's names: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``
    (``tunekit.losses.preference.preference_metric_sums`` / ``kto_metric_sums``), ``logits/chosen``,
    ``logits/rejected`` (the mean logit over the vocabulary and the completions' tokens) and for
    KTO ``kl``."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}

    def _add(self, values: Mapping[str, torch.Tensor | float]) -> None:
        for k, v in values.items():  # tensors stay on the device: one sync in means()
            self.sums[k] = self.sums.get(k, 0.0) + v

    @torch.no_grad()
    def add(self, objective: Objective, policy: SequenceLogps, batch: Mapping[str, torch.Tensor]) -> None:
        chosen, rejected = slice(0, None, 2), slice(1, None, 2)
        if objective.kl is not None:  # KTO: the odd sequences are the KL completions
            desirable = batch["desirable"]
            rewards = torch.zeros_like(policy.logps[chosen])
            rewards[desirable], rewards[~desirable] = objective.chosen_rewards, objective.rejected_rewards
            self._add(kto_metric_sums(rewards, policy.logps[chosen], desirable))
            mine, theirs = policy.logit_sums[chosen], policy.tokens[chosen]
            self._add({"logits/chosen": mine[desirable].sum(), "logits/rejected": mine[~desirable].sum(),
                       "tokens/chosen": theirs[desirable].sum(), "tokens/rejected": theirs[~desirable].sum(),
                       "kl": objective.kl, "kl_batches": 1.0})
        else:
            if objective.chosen_rewards is not None:
                self._add(preference_metric_sums(objective.chosen_rewards, objective.rejected_rewards,
                                                 policy.logps[chosen], policy.logps[rejected]))
            else:  # a loss without rewards: the log-probs alone
                n = float(objective.losses.numel())
                self._add({"logps/chosen": policy.logps[chosen].sum(), "logps/rejected": policy.logps[rejected].sum(),
                           "num_chosen": n, "num_rejected": n})
            self._add({"logits/chosen": policy.logit_sums[chosen].sum(),
                       "logits/rejected": policy.logit_sums[rejected].sum(),
                       "tokens/chosen": policy.tokens[chosen].sum(), "tokens/rejected": policy.tokens[rejected].sum()})
        self._add({"loss": objective.losses.detach().sum(), "examples": float(objective.losses.numel())})

    def means(self, prefix: str = "") -> dict[str, float]:
        """The metrics over every rank (one all-reduce; collective under a process group)."""
        keys = sorted(self.sums)
        totals = dict(zip(keys, (torch.tensor(v) for v in sum_over_ranks(*(float(self.sums[k]) for k in keys)))))
        out = {"loss": float(totals["loss"] / max(float(totals["examples"]), 1.0))}
        out.update(metric_means({k: v for k, v in totals.items() if "/" in k or k.startswith("num_")}))
        for side in ("chosen", "rejected"):
            if float(totals.get(f"tokens/{side}", 0)) > 0:
                out[f"logits/{side}"] = float(totals[f"logits/{side}"] / totals[f"tokens/{side}"])
        if "kl" in totals:
            out["kl"] = float(totals["kl"] / max(float(totals["kl_batches"]), 1.0))
        return {f"{prefix}{k}": v for k, v in out.items()}


@torch.no_grad()
def evaluate_preference(model: nn.Module, loaders: Mapping[str, Iterable], *, loss_cfg: Mapping[str, Any], device,
                        max_batches: int | None, reference: nn.Module | None = None,
                        uses_reference: bool = True) -> dict[str, float]:
    """Held-out preference metrics, ``<loader name>_`` + the training names (with the loader named
    ``eval``: TRL's ``eval_loss``, ``eval_rewards/accuracies``, ...), over each loader's first
    ``max_batches`` batches, in eval mode. Every rank evaluates the same batches when the model is
    sharded (FSDP needs every rank in each forward)."""
    was_training = model.training
    model.eval()
    results = {}
    for name, loader in loaders.items():
        metrics = PreferenceMetrics()
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = move_batch(batch, device)
            policy = sequence_logps(model, batch)
            ref = reference_logps(batch, policy=model, reference=reference) if uses_reference else None
            metrics.add(preference_objective(loss_cfg, batch, policy, ref), policy, batch)
        # under FSDP every rank evaluated the same pairs: the sums over ranks scale numerators and
        # counts alike, so the means are the single-device ones
        results.update(metrics.means(prefix=f"{name}_"))
    model.train(was_training)
    return results


# -- references computed once ------------------------------------------------------------------

class WithReferenceLogps(torch.utils.data.Dataset):
    """``dataset`` (paired) whose items carry their reference log-probs: ``item["ref_logps"]`` =
    ``[chosen, rejected]`` from ``table`` [len(dataset), 2]; ``collate`` adds ``ref_logps`` [2P]
    in the batch's completion order (pair i's chosen at 2i, rejected at 2i+1)."""

    def __init__(self, dataset, table: torch.Tensor):
        if table.shape != (len(dataset), 2):
            raise ValueError(f"WithReferenceLogps: table {list(table.shape)} for {len(dataset)} pairs")
        self.dataset, self.table = dataset, table

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "ref_logps": self.table[i]}

    def collate(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = self.dataset.collate([{k: v for k, v in item.items() if k != "ref_logps"} for item in batch])
        out["ref_logps"] = torch.stack([item["ref_logps"] for item in batch]).reshape(-1)
        return out


def check_batch_fits_loss(loss_cfg: Mapping[str, Any], batch_size: int) -> None:
    """KTO's KL estimate pairs each example with another completion of its micro-batch, so it
    needs ``batch_size >= 2`` (TRL refuses 1 too): a UserError otherwise."""
    if is_kto(loss_cfg) and batch_size < 2:
        raise UserError("batch_size=1 with loss_type kto: the KL estimate pairs each example with another "
                        "completion of its batch; use batch_size >= 2")


def check_dataset_fits_loss(loss_cfg: Mapping[str, Any], dataset, name: str) -> None:
    """KTO losses read unpaired examples (``kto_dataset``), the others pairs (``preference_dataset``
    or any dataset of the Preference batch contract without ``desirable``): a UserError naming the
    config node ``name`` otherwise."""
    from tunekit.data.preference import KTODataset

    loss_type = loss_cfg["loss_type"]
    if is_kto(loss_cfg) and not isinstance(dataset, KTODataset):
        raise UserError(f"{name}: loss.loss_type {loss_type} trains on unpaired examples, but {name} builds "
                        f"{type(dataset).__name__}; use _component_: tunekit.data.kto_dataset (it also unpairs a "
                        "file of chosen/rejected pairs)")
    if not is_kto(loss_cfg) and isinstance(dataset, KTODataset):
        raise UserError(f"{name}: loss.loss_type {loss_type} trains on chosen/rejected pairs, but {name} builds "
                        "a kto_dataset (unpaired examples); use _component_: tunekit.data.preference_dataset, "
                        "or loss.loss_type=kto")


def with_precomputed_reference(cfg, reference: nn.Module | Callable[[], nn.Module], dataset, name: str,
                               device: torch.device, *, adapters_off: bool):
    """``dataset`` (the config's ``name`` node built; first checked to fit the loss,
    :func:`check_dataset_fits_loss`) carrying its reference log-probs, computed
    once by ``reference`` (a model, or a function building it when the cache does not hold them
    yet; ``adapters_off``: the LoRA policy with its adapters switched off) and
    cached in ``cfg.reference_cache_dir`` under a key of the data, the tokenizer, the dtype and the
    reference checkpoint's files, when ``cfg.precompute_reference`` is on and the loss has a
    reference; else ``dataset`` itself (also None for a null node). Collective under a process group."""
    from omegaconf import OmegaConf

    from tunekit.checkpoint.hf_checkpoint import weight_files

    if dataset is not None:
        check_dataset_fits_loss(cfg.loss, dataset, name)
    if dataset is None or not cfg.precompute_reference or not needs_reference(cfg.loss):
        return dataset
    if is_kto(cfg.loss):
        raise UserError("precompute_reference=true: KTO's KL completions pair each example with another of its "
                        "batch, which changes every epoch; set precompute_reference=false for loss_type kto")
    checkpoint = Path(cfg.checkpoint_dir)
    key = reference_cache_key(name, OmegaConf.to_container(cfg[name], resolve=True),
                              OmegaConf.to_container(cfg.tokenizer, resolve=True), cfg.dtype, len(dataset),
                              files=[*weight_files(checkpoint), checkpoint / "config.json"])
    table = precompute_reference_logps(reference, dataset, cache_dir=cfg.reference_cache_dir, key=key,
                                       batch_size=cfg.batch_size, device=device, adapters_off=adapters_off)
    return WithReferenceLogps(dataset, table)


def reference_cache_key(*parts: Any, files: Iterable[str | os.PathLike] = ()) -> str:
    """A hex key naming the reference log-probs of some data under some reference model: a hash of
    ``parts`` (the dataset and tokenizer config, the dtype, ...) and of each file's path, size and
    modification time (the reference weights, the data files)."""
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode())
    for f in sorted(str(f) for f in files):
        stat = os.stat(f)
        h.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def precompute_reference_logps(model: nn.Module | Callable[[], nn.Module], dataset, *, cache_dir: str | os.PathLike,
                               key: str, batch_size: int, device: torch.device, adapters_off: bool,
                               chunk_batches: int = 8) -> torch.Tensor:
    """The reference log-probs [len(dataset), 2] of a paired dataset, computed once and cached as
    ``<cache_dir>/<key>.pt`` (reused by any later run with the same key; a run stopped mid-way
    continues from ``<key>.partial.pt``). ``model`` is the reference, or a function building it
    (called only when something is left to compute); ``adapters_off``: a LoRA policy with its
    adapters switched off. Under a process group rank 0 reads and writes the cache (its table is
    broadcast), and every rank computes every ``world_size``-th batch of each chunk, the results
    gathered (collective: FSDP needs every rank in each forward, so ranks without a batch of their
    own run a copy of one)."""
    cache = Path(cache_dir)
    final, partial = cache / f"{key}.pt", cache / f"{key}.partial.pt"
    world, rank = get_world_size_and_rank()
    try:  # every rank, before any collective, so that all of them stop alike on a bad path
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"reference_cache_dir: cannot create {cache} ({e.strerror or e}); "
                        "set reference_cache_dir to a writable folder") from None
    cached = broadcast_from_rank0(_load_table(final) if rank == 0 and final.is_file() else None)
    if cached is not None:
        if cached.shape != (len(dataset), 2):
            raise CheckpointError(f"{final}: holds {cached.shape[0]} pairs but the dataset has {len(dataset)}; "
                                  "delete it")
        log_rank_zero(log, f"reference log-probs: reusing {final}")
        return cached
    done = broadcast_from_rank0(_load_table(partial) if rank == 0 and partial.is_file() else torch.empty(0, 2))
    if len(done):
        log_rank_zero(log, f"reference log-probs: continuing at pair {len(done)} of {len(dataset)} ({partial})")
    model = model if isinstance(model, nn.Module) else model()
    was_training = model.training
    model.eval()
    n = len(dataset)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(len(done), n, batch_size)]
    per_chunk = chunk_batches * world
    try:
        for c in range(0, len(batches), per_chunk):
            chunk = batches[c:c + per_chunk]
            mine = chunk[rank::world] or [chunk[0]]  # a rank without a batch runs a copy (collectives)
            results = []
            for r in range(-(-len(chunk) // world)):
                indices = mine[min(r, len(mine) - 1)]
                batch = move_batch(dataset.collate([dataset[i] for i in indices]), device)
                with torch.no_grad(), (adapters_disabled(model) if adapters_off else contextlib.nullcontext()):
                    logps = sequence_logps(model, batch).logps
                results.append((indices, logps.view(-1, 2).float().cpu()))
            done = torch.cat([done, _gather_rows(results, chunk, world)])
            if rank == 0:
                _atomic_save(done, partial)
            log_rank_zero(log, f"reference log-probs: {len(done)} of {n} pairs")
    finally:
        model.train(was_training)
    if rank == 0:
        _atomic_save(done, final)
        partial.unlink(missing_ok=True)
    return done


def _gather_rows(results: list[tuple[list[int], torch.Tensor]], chunk: list[list[int]], world: int) -> torch.Tensor:
    """Every rank's (indices, rows) of a chunk -> the chunk's rows in dataset order, on every rank."""
    mine = {i: row for indices, rows in results for i, row in zip(indices, rows)}
    if is_distributed():
        import torch.distributed as dist

        gathered: list[dict] = [None] * world
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    order = [i for batch in chunk for i in batch]
    return torch.stack([mine[i] for i in order])


def _load_table(path: Path) -> torch.Tensor:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001  torch.load of a damaged file raises assorted types; the file is named
        raise CheckpointError(f"{path}: unreadable cached reference log-probs ({type(e).__name__}); delete it "
                              "to compute them again") from None


def _atomic_save(tensor: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(tensor, tmp)
    os.replace(tmp, path)
