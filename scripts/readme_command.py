"""Print one of the README's copy-paste set-up commands (`main` or `tests`).

The README marks each with an HTML comment `<!-- command: NAME -->` right before a ```bash block;
CI runs the `tests` one through this script so that README and CI cannot drift apart.
"""

import re
import sys
from pathlib import Path


def readme_command(name: str, readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    m = re.search(rf"<!-- command: {re.escape(name)} -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    if not m:
        raise SystemExit(f"{readme}: no block marked <!-- command: {name} -->")
    return " ".join(line.rstrip("\\").strip() for line in m.group(1).strip().splitlines())


if __name__ == "__main__":
    print(readme_command(sys.argv[1], Path(__file__).resolve().parents[1] / "README.md"))
