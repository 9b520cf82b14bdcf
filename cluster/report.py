"""The run report: ``runs/<name>/report.json`` plus a Markdown summary beside it."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    """Write report.json and report.md; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    keys = ("metric", "teacher_score", "student_score_before", "student_score_after", "steps",
            "final_weight_version", "rows_by_source", "wall_seconds", "rollout_tokens_per_s",
            "learner_tokens_per_s")
    lines = [f"# ammd run `{report.get('name')}`", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(report.get(k))} |" for k in keys]
    examples = report.get("examples_after") or []
    if examples:
        lines += ["", "## Student outputs after training (first few held-out prompts)", "",
                  "| prompt | reference | output |", "|---|---|---|"]
        lines += [f"| `{e['prompt']}` | `{e['reference']}` | `{e['output']}` |" for e in examples]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return path
