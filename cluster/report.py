"""The run report: ``runs/<name>/report.json``, a Markdown summary and ``curves.png`` beside it."""
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
            "final_weight_version", "rows_by_source", "rollout_usage", "wall_seconds", "rollout_tokens_per_s",
            "learner_tokens_per_s", "restarts", "lost_rows")
    lines = [f"# ammd run `{report.get('name')}`", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(report.get(k))} |" for k in keys]
    if report.get("resumes") or report.get("recovery_problems"):
        lines += ["", "## Recovery", ""]
        lines += [f"- resumed from `{r['from']}` (step {r['step']})" for r in report.get("resumes") or []]
        lines += [f"- replay buffer: {p}" for p in report.get("recovery_problems") or []]
    if report.get("placement"):
        lines += ["", "## Placement", "", placement_summary(report["placement"])]
    examples = report.get("examples_after") or []
    if examples:
        lines += ["", "## Student outputs after training (first few held-out prompts)", "",
                  "| prompt | reference | output |", "|---|---|---|"]
        lines += [f"| `{e['prompt']}` | `{e['reference']}` | `{e['output']}` |" for e in examples]
    if plot_curves(report.get("history") or [], out_dir / "curves.png"):
        lines += ["", "## Curves", "", "![loss and moment-matching distances over steps](curves.png)"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return path


def placement_summary(placement: dict[str, dict[str, str]]) -> str:
    """``{actor: {"node_id", "node_ip"}}`` as one "; "-separated part per node, actors in the
    order listed: "learner-0, buffer on 10.0.0.2 (node 1a2b3c4d); ..."."""
    nodes: dict[tuple[str, str], list[str]] = {}
    for name, where in placement.items():
        nodes.setdefault((where["node_ip"], where["node_id"]), []).append(name)
    return "; ".join(f"{', '.join(names)} on {ip} (node {node[:8]})" for (ip, node), names in nodes.items())


CURVES = (("loss", "student loss"), ("d_on", "D_on (on-policy distance)"),
          ("d_off", "D_off (off-policy distance)"), ("adversary_loss", "adversary loss"))


def plot_curves(history: list[dict], path: Path) -> bool:
    """One panel per metric present in the history (AMM adds D_on, D_off, adversary loss).

    Returns False, writing nothing, when there is no history or matplotlib is not installed.
    """
    series = [(key, title) for key, title in CURVES if any(key in h for h in history)]
    if not series:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (key, title) in zip(axes[0], series):
        for name, style in ((key, "-"), (f"{key}_true", "--")):  # AMM: the best response's distance
            points = [(h["step"], h[name]) for h in history if name in h]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, lw=1,
                        label="learned adversary" if name == key else "best response (oracle)")
        if any(f"{key}_true" in h for h in history):
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("learner step", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
