"""Run every benchmark of bench/ with its default (small) size and print their ratio lines.

    .venv/bin/python bench/run_all.py [--only scan,fetch,...]     (what `make bench` runs)

Each benchmark measures its own baseline in the same run and prints a ratio; this only runs
them one after another (never in parallel: they time CPU work) and collects the output.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BENCHES = ("scan", "fetch", "crop", "write", "pipeline", "annotate", "search_user")
HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmark names")
    args = parser.parse_args()
    failed = []
    for name in [part for part in args.only.split(",") if part]:
        script = os.path.join(HERE, f"bench_{name}.py")
        print(f"\n=== bench_{name}.py", flush=True)
        start = time.monotonic()
        result = subprocess.run([sys.executable, script], cwd=os.path.dirname(HERE))
        print(f"=== bench_{name}.py: exit {result.returncode} in {time.monotonic() - start:.0f} s",
              flush=True)
        if result.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
