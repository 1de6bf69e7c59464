"""Rewrite the benchmark table in benchmarks/README.md from the committed results JSONs.

    python benchmarks/table.py            # rewrites benchmarks/README.md between the markers
    python benchmarks/table.py --print    # prints the table only

Order: the scripts in ``ORDER`` first, then any other results file, each with its ``targets`` in
the order the script wrote them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDER = [
    "fidelity",
    "step",
    "losses",
    "cache",
    "students",
    "scale",
    "student_speed",
    "quantize",
    "gguf_round_trip",
    "weight_only_kernels",
    "encoders",
    "onpolicy",
]
START, END = "<!-- BENCHMARKS -->", "<!-- /BENCHMARKS -->"


def _number(value: float) -> str:
    return f"{value:.3g}"


def _row(script: str, entry: dict) -> str:
    value, goal, better = entry["value"], entry.get("target"), entry["better"]
    if goal is None:
        return f"| `{script}.py` | `{entry['name']}` | {_number(value)} | - | reported |"
    op = ">=" if better == "higher" else "<="
    loose_met = value >= goal if better == "higher" else value <= goal
    met = entry.get("met", loose_met)
    if loose_met and not met:  # the script held the target strictly ("above 0")
        op = op[0]
    verdict = "met" if met else "**missed**"
    return f"| `{script}.py` | `{entry['name']}` | {_number(value)} | {op} {_number(goal)} | {verdict} |"


def table() -> str:
    files = {path.stem: path for path in RESULTS.glob("*.json")}
    names = [name for name in ORDER if name in files] + sorted(set(files) - set(ORDER))
    lines = ["| script | target | value | goal | |", "|---|---|---|---|---|"]
    for name in names:
        results = json.loads(files[name].read_text())
        lines += [_row(name, entry) for entry in results.get("targets", [])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table, change nothing")
    args = parser.parse_args()
    rendered = table()
    if args.print:
        print(rendered)
        return
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    while after.startswith(END):  # earlier runs left repeated end markers
        after = after[len(END) :]
    readme.write_text(f"{before}{START}\n{rendered}\n{END}{after}")
    print(f"rewrote the table in {readme}")


if __name__ == "__main__":
    main()
