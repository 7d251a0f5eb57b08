"""``tunekit download <hf-repo> --output-dir D [--token T]``: fetch a checkpoint from the Hugging Face Hub."""

from __future__ import annotations

import argparse
import os

from tunekit.cli.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("download", help="download a model from the Hugging Face Hub (needs tunekit[hf])")
    p.add_argument("repo_id", help="e.g. meta-llama/Llama-3.2-1B-Instruct")
    p.add_argument("--output-dir", required=True, help="folder to write the checkpoint into")
    p.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="Hub token for gated models "
                   "(default: $HF_TOKEN)")
    p.add_argument("--ignore-patterns", nargs="*", default=["original/*"],
                   help="files to skip (default: original/*, the non-HF weights some repos carry)")
    p.set_defaults(func=run)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def run(args: argparse.Namespace) -> int:
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise UsageError('downloading needs huggingface_hub: pip install "tunekit[hf]"') from None
    try:
        path = huggingface_hub.snapshot_download(args.repo_id, local_dir=args.output_dir, token=args.token,
                                                 ignore_patterns=args.ignore_patterns or None)
    except hub_errors.GatedRepoError:
        raise UsageError(f"{args.repo_id} is gated: accept its license on huggingface.co and pass "
                         "--token (or set HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise UsageError(f"no Hub repository {args.repo_id!r} (or it is private: pass --token)") from None
    except hub_errors.LocalEntryNotFoundError:  # what a failed connection turns into
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise UsageError(f"the Hugging Face Hub ({endpoint}) is unreachable; check the network or "
                         "proxy settings") from None
    except hub_errors.HfHubHTTPError as e:
        raise UsageError(f"the Hub refused {args.repo_id}: {_first_line(e)}") from None
    except OSError as e:
        raise UsageError(f"cannot write the checkpoint to {args.output_dir}: {e}") from None
    print(f"downloaded {args.repo_id} to {path}")
    return 0
