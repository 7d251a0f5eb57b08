"""``python -m tunekit.cli.launch [torchrun options] <recipe.py> [recipe args]``: torchrun, run in
this process (``tunekit run`` execs it, so this process is torchrun's agent and receives the
signals sent to the launched command), with one change: when ranks fail, the summary is one
``tunekit: error:`` line instead of torchrun's Python traceback (the ranks' own errors are already
in the output above it). Exit code 2 when every failed rank exited 2 (a user error, reported on
those ranks), else torchrun's 1."""

from __future__ import annotations

import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str]) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        failed = sorted(e.failures.items())
        codes = sorted({f.exitcode for _, f in failed})
        ranks = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in failed)
        print(f"tunekit: error: {Path(e.name).name} failed on {ranks}; the ranks' own errors are above", file=sys.stderr)
        return 2 if codes == [2] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
