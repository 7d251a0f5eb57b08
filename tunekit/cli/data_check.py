"""``tunekit data check <config.yaml | files...>``: a short report on training data.

With data files: ``tunekit data check train.jsonl --eval eval.jsonl [--format sharegpt]
[--tokenizer CHECKPOINT_DIR] [--max-seq-len 2048]``. With a config (a .yaml file or a built-in name
such as ``tiny/lora``; never taken for a hub dataset), the ``dataset`` node gives the source,
format, column_map and max_seq_len, the ``tokenizer`` node the tokenizer, and every evaluation set
the recipes read (``val_dataset``, ``forget_dataset``, ``eval_dataset``, a ``{train, validation}``
source) is checked for contamination in its own format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunekit.cli.errors import UsageError
from tunekit.config.catalog import builtin_configs, find_config
from tunekit.config.errors import UserError

# The builder a config names decides the row format (its `format` key, when present, wins).
_BUILDER_FORMATS = {"instruct_dataset": "alpaca", "chat_dataset": "openai",
                    "text_completion_dataset": "text", "preference_dataset": "preference", "kto_dataset": "kto"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data check`` on the ``tunekit`` command's subparsers."""
    data = subparsers.add_parser("data", help="inspect training data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="counts, length histogram, duplicates, eval contamination",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="a config .yaml or data files/directories")
    p.add_argument("--eval", nargs="+", default=None,
                   help="eval files checked for contamination (instead of a config's evaluation sets)")
    p.add_argument("--format", default=None,
                   help="auto, alpaca, input_output, sharegpt, openai, preference, kto or text (default: auto)")
    p.add_argument("--column-map", nargs="*", default=[], metavar="EXPECTED=ACTUAL",
                   help="column names, e.g. output=response")
    p.add_argument("--tokenizer", default=None, help="HF checkpoint dir: count lengths in tokens")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--text-split", default=None, choices=("file", "paragraph"),
                   help=".txt files: one document per file or per blank-line separated block")
    p.add_argument("--near-dup-threshold", type=float, default=0.8)
    p.add_argument("--max-leaders", type=int, default=8,
                   help="near duplicates: leaders each LSH bucket compares its rows with (bounds the work)")
    p.set_defaults(func=run)
    return p


def _config_settings(path: Path) -> dict:
    from omegaconf import OmegaConf

    from tunekit.checkpoint.step_folders import find_model_dir
    from tunekit.config import instantiate, load

    cfg = load(path)  # also registers the ${asset:...} resolver
    if "dataset" not in cfg:
        raise UsageError(f"{path}: no 'dataset' key; pass data files instead")
    ds = cfg.dataset

    def resolved(key: str):
        """The value at ``key``, interpolations resolved, as plain Python (None when absent)."""
        value = OmegaConf.select(cfg, key)  # a string, or a list / {train, validation} node
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    def data_settings(node) -> dict:
        """format (the node's, else its builder's), column_map and text_split of a dataset node."""
        builder = str(node.get("_component_", "")).rsplit(".", 1)[-1]
        return {"format": node.get("format") or _BUILDER_FORMATS.get(builder, "auto"),
                "column_map": OmegaConf.to_container(node.column_map) if node.get("column_map") else None,
                "text_split": node.get("text_split") or "file"}

    source = resolved("dataset.source")
    if source is None:
        raise UsageError(f"{path}: dataset.source is missing")
    settings = {"train": source, "evals": {}, "label": f"{path}: dataset.source",
                "max_seq_len": ds.get("max_seq_len"), "tokenizer": None, **data_settings(ds)}
    if isinstance(source, dict):
        settings["train"] = source.get("train")
        if source.get("validation") is not None:
            settings["evals"]["validation"] = {"source": source["validation"],
                                               "label": f"{path}: dataset.source.validation"}
    # The recipes' evaluation sets (and eval_dataset, as other tools name it), each in its own format.
    for name in ("val_dataset", "forget_dataset", "eval_dataset"):
        eval_source = resolved(f"{name}.source")
        if eval_source is not None:
            settings["evals"][name] = {"source": eval_source, "label": f"{path}: {name}.source",
                                       **data_settings(cfg[name])}
    if cfg.get("tokenizer"):
        try:
            if cfg.get("checkpoint_dir"):  # a training run's folder stands for its newest step_<N>/, as in the recipes
                cfg.checkpoint_dir = str(find_model_dir(cfg.checkpoint_dir))
            settings["tokenizer"] = instantiate(cfg.tokenizer)
        except UserError as e:  # e.g. the checkpoint is not downloaded: the report still works with word counts
            print(f"note: could not build the config's tokenizer ({e}); counting words", file=sys.stderr)
    return settings


def _is_config(name: str) -> bool:
    """A .yaml file or a built-in config name (``tiny/lora``): never taken for a data file or hub dataset."""
    return Path(name).suffix in (".yaml", ".yml") or name in builtin_configs()


def run(args: argparse.Namespace) -> int:
    # Imported here: `tunekit ls` and friends import this module and must not pay for torch/numpy.
    from tunekit.data.check import check_data, format_report

    if len(args.inputs) == 1 and _is_config(args.inputs[0]):
        settings = _config_settings(find_config(args.inputs[0]))
    else:
        settings = {"train": args.inputs, "evals": {}, "label": None, "format": "auto", "column_map": None,
                    "max_seq_len": None, "text_split": "file", "tokenizer": None}
    if args.eval:
        settings["evals"] = {"eval": {"source": args.eval}}
    if args.format:
        settings["format"] = args.format
    if args.column_map:
        pairs = [kv.split("=", 1) for kv in args.column_map]
        if any(len(p) != 2 for p in pairs):
            raise UsageError("--column-map takes EXPECTED=ACTUAL pairs, e.g. output=response")
        settings["column_map"] = dict(pairs)
    if args.max_seq_len:
        settings["max_seq_len"] = args.max_seq_len
    if args.text_split:
        settings["text_split"] = args.text_split
    if args.tokenizer:
        from tunekit.data.tokenizers import from_hf

        settings["tokenizer"] = from_hf(args.tokenizer)
    report = check_data(settings["train"], evals=settings["evals"], tokenizer=settings["tokenizer"],
                        format=settings["format"], column_map=settings["column_map"],
                        max_seq_len=settings["max_seq_len"], text_split=settings["text_split"],
                        near_dup_threshold=args.near_dup_threshold, label=settings["label"],
                        max_leaders=args.max_leaders)
    print(format_report(report))
    return 1 if report.bad_rows else 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m tunekit.cli.data_check check FILES``)."""
    parser = argparse.ArgumentParser(prog="tunekit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data"] + (sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except UserError as e:  # as the tunekit command reports it
        print(f"tunekit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
