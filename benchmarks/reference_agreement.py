"""How closely this tool reproduces the reference tool's own output (tests/data/reference).

For every golden case: the worst cos(dW_reference, dW_project) over its edited tensors, the
largest share of elements more than one bf16 ulp apart, and how many edited tensors are
bit-identical. Tiny cases are compared whole (rewritten through the CLI); Qwen cases on
the golden file's sampled columns, plus one whole rewrite whose output hashes are compared
with the reference's. Prints a markdown table.

    python benchmarks/reference_agreement.py [--no-qwen]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the golden cases live with the tests

from rewriter.io.checkpoint import Checkpoint  # noqa: E402
from rewriter.pipeline import prepare  # noqa: E402
from rewriter.plan import load_plan  # noqa: E402
from tests.test_reference import (CASES, DATA, QWEN, SCALE_IGNORED, TINY, agreement,  # noqa: E402
                                  project_args, rewritten, sampled, tensors)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def tiny_rows(tmp: Path) -> list[tuple[str, float, float, str]]:
    rows = []
    for case in TINY:
        if case["name"] in SCALE_IGNORED:
            continue
        source, ours = tensors(DATA / case["model"]), rewritten(case, tmp)
        expected = load_file(DATA / "expected" / f"{case['name']}.safetensors")
        scores = [agreement(source[n], t, ours[n]) for n, t in expected.items()]
        same = sum(torch.equal(ours[n].view(torch.uint8), t.view(torch.uint8)) for n, t in expected.items())
        rows.append((case["name"], min(c for c, _ in scores), max(f for _, f in scores), f"{same}/{len(expected)}"))
    return rows


def qwen_rows(qwen: Path, tmp: Path) -> list[tuple[str, float, float, str]]:
    rows, ckpt = [], Checkpoint.open(qwen)
    for case in QWEN:
        job = prepare(qwen, None, DATA / case["refuse"], load_plan(DATA / case["plan"]), project_args(case["flags"])[1])
        expected, columns = sampled(case)
        scores, same = [], 0
        for record in case["edited"]:
            name = record["name"]
            full, _ = job.edits[name].apply(ckpt.tensor(name))
            same += _sha(full) == record["output_sha256"]
            cols = columns[record["shape"][1]]
            scores.append(agreement(ckpt.tensor(name)[:, cols], expected[name], full[:, cols]))
        rows.append((case["name"], min(c for c, _ in scores), max(f for _, f in scores), f"{same}/{len(scores)}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-qwen", action="store_true", help="only the tiny models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = tiny_rows(Path(tmp))
        if not args.no_qwen:
            from rewriter.lab.example_models import example_model

            rows += qwen_rows(example_model("qwen2.5-coder-0.5b-instruct"), Path(tmp))
    print(f"{len(CASES)} golden cases; the reference tool's scale-ignoring cases ({len(SCALE_IGNORED)}) "
          "and crashes are left out (docs/method.md)")
    print("| case | min cos(dW) | max share > 1 ulp | bit-identical tensors |")
    print("| --- | --- | --- | --- |")
    for name, cos, far, same in rows:
        print(f"| {name} | {cos:.6f} | {far:.3%} | {same} |")


if __name__ == "__main__":
    main()
