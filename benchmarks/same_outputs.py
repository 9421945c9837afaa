"""Are two runs' output directories the same, byte for byte, apart from wall-clock timestamps?

    python benchmarks/same_outputs.py BEFORE/results AFTER/results

For checking that a change which should not change results does not: every file under either
directory is compared by content. Only what records the time of a run may differ: the report's
timings and generation time (``report.html``, ``report_*.html`` before several years per run) and ``generated_at`` in ``tessera_metadata.json``
(compared without it). Prints one line per file that differs or exists on one side only, then a
summary; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# Files that hold the wall-clock time of the run, and how to compare them without it.
TIMED = {"tessera_metadata.json": lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                                            if k != "generated_at"}, sort_keys=True)}
TIMED_PATTERNS = ("report.html", "report_*.html")


def digest(path: Path) -> str:
    if path.name in TIMED:
        return hashlib.sha256(TIMED[path.name](path.read_text()).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = files(args.before), files(args.after)
    differing, timed = [], []
    for name in sorted(before.keys() | after.keys()):
        if name not in before or name not in after:
            differing.append(f"only in {'after' if name in after else 'before'}: {name}")
        elif any(Path(name).match(pattern) for pattern in TIMED_PATTERNS):
            timed.append(name)
        elif digest(before[name]) != digest(after[name]):
            differing.append(f"differs: {name}")
    for line in differing:
        print(line)
    compared = len(before.keys() & after.keys()) - len(timed)
    print(f"{compared} files compared byte for byte ({', '.join(TIMED)} without generated_at), "
          f"{len(timed)} with run timings not compared ({', '.join(timed)}); {len(differing)} differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
