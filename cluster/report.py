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


def ending(report: dict[str, Any], run_dir: Path) -> str:
    """The lines ``ammd run`` ends with, for a person: the scores (before -> after, and the
    teacher's), steps, throughput, wall time, restarts, and where the student, the report and
    the TensorBoard logs are. report.json keeps everything; this is what to read first."""
    def score(key: str) -> str:
        value = report.get(key)
        return "n/a" if value is None else "nan" if math.isnan(value) else f"{value:.3f}"

    restarts = ", ".join(f"{name} x{n}" for name, n in sorted((report.get("restarts") or {}).items())) or "none"
    tokens = f"{report.get('rollout_tokens_per_s') or 0:,.0f} rollout, {report.get('learner_tokens_per_s') or 0:,.0f} learner"
    rows = [("student", f"{report.get('metric')} {score('student_score_before')} -> {score('student_score_after')} "
                        f"(teacher {score('teacher_score')})"),
            ("steps", f"{report.get('steps')} in {report.get('wall_seconds') or 0:.0f} s"
                      + (f", the first {first:.0f} s after start" if (first := report.get("seconds_to_first_step"))
                         is not None else "")),
            ("tokens/s", tokens), ("restarts", restarts),
            ("lost rows", str(report.get("lost_rows") or 0)),
            ("saved to", str(report.get("student_dir"))),
            ("report", f"{run_dir / 'report.md'} (all of it in report.json)")]
    if (run_dir / "tb").is_dir():
        rows.append(("curves", f"tensorboard --logdir {run_dir / 'tb'}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"ammd run {report.get('name')}: done"] + [f"  {k:<{width}}  {v}" for k, v in rows])


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
