"""How long the commands that touch no tensor take to answer: wall time of a fresh process.

    python benchmarks/cli_startup.py [--checkpoint PATH_OR_EXAMPLE] [--repeat 7]

Times, each ``--repeat`` times (median and worst), ``abliterate --help``, every command's
``--help``, ``abliterate plugins``, ``abliterate inspect`` on a checkpoint (default: the
Qwen example, converted first if it is not yet), and, for scale, ``python -c "import torch"``.
Prints markdown with the date and machine; asserts nothing (tests/test_cli.py checks that
none of these imports torch or transformers).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import statistics
import subprocess
import sys
import time

from rewriter.cli import COMMANDS


def seconds(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    tool = shutil.which("abliterate") or sys.exit("abliterate is not installed in this environment")
    subprocess.run([tool, "example-model", args.checkpoint], stdout=subprocess.DEVNULL, check=False)
    cases = {"abliterate --help": [tool, "--help"], "abliterate plugins": [tool, "plugins"],
             f"abliterate inspect {args.checkpoint}": [tool, "inspect", args.checkpoint],
             **{f"abliterate {name} --help": [tool, name, "--help"] for name in COMMANDS},
             'python -c "import torch" (for scale)': [sys.executable, "-c", "import torch"]}
    for cmd in cases.values():
        seconds(cmd)  # warm the page cache
    print(f"{datetime.date.today()}, {platform.machine()}, Python {platform.python_version()}, "
          f"median and worst of {args.repeat}\n")
    print("| command | median s | worst s |\n| --- | --: | --: |")
    for label, cmd in cases.items():
        times = [seconds(cmd) for _ in range(args.repeat)]
        print(f"| `{label}` | {statistics.median(times):.2f} | {max(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
