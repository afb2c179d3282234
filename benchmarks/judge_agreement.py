"""How well each refusal judge agrees with the hand labels of saved answers (tests/data/labels/).

A label is one of refusal, deflection, disclaimer (compliance with a disclaimer) and compliance;
a verdict agrees when it calls refusals and deflections refusals and the other two not. The
project markers and the broad markers need no model; each --judge runs on the CPU:

    python benchmarks/judge_agreement.py --judge qwen2.5-coder-0.5b-instruct
    python benchmarks/judge_agreement.py --judge path/to/classifier:refusal   # a classifier and its label

Prints, per judge, the agreement, the refusals it finds and those it misses, the answers it
calls refusals wrongly, and how it calls each label; for a model judge also the AUC of its
probability (its ranking, whatever the threshold); --json writes the same as JSON, with each
model judge's probabilities.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewriter.lab.judge import THRESHOLD, check_judge, judge_answers  # noqa: E402
from rewriter.lab.markers import MARKER_SETS, is_refusal  # noqa: E402

LABELS_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "labels" / "qwen-answers.jsonl"
LABELS = ("refusal", "deflection", "disclaimer", "compliance")
REFUSING = ("refusal", "deflection")


def read_labels(path: Path = LABELS_FILE) -> list[dict[str, str]]:
    """The labelled answers: prompt, answer, source (the model that gave it), category, label."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [r for r in rows if r.get("label") not in LABELS]
    if bad:
        raise SystemExit(f"{path}: {len(bad)} rows without a known label ({', '.join(LABELS)})")
    return rows


def agreement(rows: list[dict[str, str]], verdicts: list[bool]) -> dict[str, object]:
    """Agreement with the labels, found and missed refusals, false alarms, and the verdicts per label."""
    truth = [r["label"] in REFUSING for r in rows]
    per_label = {lab: sum(v for r, v in zip(rows, verdicts) if r["label"] == lab) for lab in LABELS}
    return {
        "agreement": sum(t == v for t, v in zip(truth, verdicts)) / len(rows),
        "refusals_found": sum(t and v for t, v in zip(truth, verdicts)),
        "refusals_missed": sum(t and not v for t, v in zip(truth, verdicts)),
        "false_refusals": sum(v and not t for t, v in zip(truth, verdicts)),
        "called_refusal_per_label": per_label,
    }


def auc(rows: list[dict[str, str]], p: list[float]) -> float:
    """How well the judge's probability ranks refusals above the rest, whatever the threshold:
    the chance that a labelled refusal or deflection gets a higher p than a compliant answer."""
    yes = [x for r, x in zip(rows, p) if r["label"] in REFUSING]
    no = [x for r, x in zip(rows, p) if r["label"] not in REFUSING]
    return sum((a > b) + 0.5 * (a == b) for a in yes for b in no) / max(len(yes) * len(no), 1)


def marker_verdicts(rows: list[dict[str, str]]) -> dict[str, list[bool]]:
    return {f"{name} markers": [is_refusal(r["answer"], markers) for r in rows] for name, markers in MARKER_SETS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, default=LABELS_FILE)
    parser.add_argument("--judge", action="append", default=[], help="MODEL or MODEL:LABEL (a classifier's refusal label)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the table as JSON here")
    args = parser.parse_args()
    rows = read_labels(args.labels)
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in LABELS}
    print(f"{len(rows)} labelled answers: " + ", ".join(f"{n} {lab}" for lab, n in counts.items()))
    table = {name: agreement(rows, v) for name, v in marker_verdicts(rows).items()}
    for spec_text in args.judge:
        model, _, label = spec_text.partition(":") if ":" in spec_text and not Path(spec_text).exists() else (spec_text, "", "")
        spec = check_judge(model, label or None)
        start = time.perf_counter()
        p = judge_answers(spec, [r["prompt"] for r in rows], [r["answer"] for r in rows], batch_size=args.batch_size)
        table[f"judge {spec.name}"] = {**agreement(rows, [x >= THRESHOLD for x in p]), "auc": auc(rows, p),
                                       "seconds": round(time.perf_counter() - start, 1), "p": p}
    print(f"{'judge':<44} agree  found  missed  false  called refusal: " + " ".join(f"{lab[:10]:>10}" for lab in LABELS))
    for name, row in table.items():
        per = row["called_refusal_per_label"]
        print(f"{name:<44} {row['agreement']:5.1%}  {row['refusals_found']:5}  {row['refusals_missed']:6}  "
              f"{row['false_refusals']:5}  {'':15} " + " ".join(f"{per[lab]:>4}/{counts[lab]:<5}" for lab in LABELS)
              + (f"  AUC {row['auc']:.3f}" if "auc" in row else ""))
    if args.json:
        args.json.write_text(json.dumps({"labels": counts, "judges": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
