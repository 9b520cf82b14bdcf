"""Tables, the beta ablation, curves and the BENCHMARKS.md section from the quality runs.

Input: the run records of ``bench.quality`` (one per task, seed and method). Scores are
aggregated over seeds as mean ± sample standard deviation; "best" is the highest mean among
the student methods, and a difference is called real only when it exceeds both spreads.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def stats(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std, n); std is 0 for a single value."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(mean: float, std: float, bold: bool = False) -> str:
    text = f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"**{text}**" if bold else text


def by_method(runs: list[dict], task: str, key: str = "test") -> dict[str, tuple[float, float, int]]:
    """method -> (mean, std, n) of ``key`` over seeds, for one task."""
    values: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if r["task"] == task:
            values[r["method"]].append(r[key])
    return {m: stats(v) for m, v in values.items()}


def amm_label(beta: float) -> str:
    """The method label of AMM at ``beta`` (``amm_beta`` reads it back)."""
    return f"AMM (beta={beta:g})"


def amm_beta(method: str) -> float | None:
    m = re.fullmatch(r"AMM \(beta=([0-9.]+)\)", method)
    return float(m.group(1)) if m else None


def is_amm(method: str) -> bool:
    """Every AMM variant's label starts with "AMM" (the beta grid, adversary classes, ...)."""
    return method.startswith("AMM")


def full_runs(runs: list[dict]) -> list[dict]:
    """Runs of the full table (every seed); ablation runs (first seed only) are left out."""
    return [r for r in runs if not r.get("ablation")]


def completed(result: dict) -> list[dict]:
    """The runs of a ``bench.quality`` result that count: finished (no ``error``) and at the
    learning rate picked for their method (runs of the grid search at other rates are left out)."""
    return [r for r in result["runs"] if "error" not in r and r.get("selected", True)]


def is_trl(method: str) -> bool:
    return method.startswith("TRL ")


# ammd method -> its TRL counterpart (issue: SFT against SFT, GKD against GKD)
COUNTERPARTS = {"SFT": "TRL SFTTrainer",
                "GKD mix (JSD 0.5, student + dataset)": "TRL GKDTrainer (lambda 0.5, beta 0.5)",
                "GKD (on-policy JSD 0.5)": "TRL GKDTrainer (on-policy, lambda 1)"}


def task_order(runs: list[dict]) -> list[str]:
    """The tasks of ``runs`` in the order they first appear."""
    return list(dict.fromkeys(r["task"] for r in runs))


def best_amm(runs: list[dict], task: str) -> str | None:
    """The AMM variant of the full table with the best mean validation score (ties: the one
    run first). Test scores play no part in the pick."""
    val = {m: s for m, s in by_method(full_runs(runs), task, "val").items() if is_amm(m)}
    return max(val, key=lambda m: val[m][0]) if val else None


def task_rows(runs: list[dict], task: str) -> list[tuple[str, str, str, tuple[float, float, int]]]:
    """(label, trains on, lr, stats) in table order: ammd's methods (of the beta grid, AMM at
    0/0.5/1 only), the AMM variant best on validation, then TRL's trainers."""
    runs = full_runs(runs)
    test = by_method(runs, task)
    mine = [r for r in runs if r["task"] == task]
    trains_on = {r["method"]: r["rows"] for r in mine}
    lr = {r["method"]: f"{r['lr']:g}" if "lr" in r else "–" for r in mine}
    order = sorted(test, key=is_trl)  # stable: ammd's methods first, in the order they ran
    rows = [(m, trains_on[m], lr[m], test[m]) for m in order
            if amm_beta(m) is None or amm_beta(m) in (0.0, 0.5, 1.0)]
    best = best_amm(runs, task)
    if best is not None:
        at = next(i for i, r in enumerate(rows) if is_trl(r[0])) if any(is_trl(r[0]) for r in rows) else len(rows)
        rows.insert(at, (f"AMM, best on validation: {best}", trains_on[best], lr[best], test[best]))
    return rows


def task_table(runs: list[dict], task: str) -> str:
    mine = [r for r in full_runs(runs) if r["task"] == task]
    metric, n = mine[0]["metric"], len({r["seed"] for r in mine})
    rows = task_rows(runs, task)
    top = max(s[0] for *_, s in rows)
    teacher, before = stats(r["teacher"] for r in mine), stats(r["student_before"] for r in mine)
    lines = [f"| Method | Trains on | lr | {metric} ×100, test (mean ± std, {n} seeds) |", "|---|---|---|---|",
             f"| Teacher | – | – | {_fmt(*teacher[:2])} |",
             f"| Student before distillation | – | – | {_fmt(*before[:2])} |"]
    lines += [f"| {label} | {on} | {lr} | {_fmt(s[0], s[1], bold=s[0] == top)} |" for label, on, lr, s in rows]
    return "\n".join(lines)


def lr_table(all_runs: list[dict], task: str, grid: list[float]) -> str:
    """Validation score of each method at each rate of the grid (first seed); the pick in bold."""
    mine = [r for r in full_runs(all_runs) if r["task"] == task and "error" not in r]
    first = min(r["seed"] for r in mine)
    lines = ["| Method | " + " | ".join(f"lr {g:g}" for g in grid) + " |", "|---" * (1 + len(grid)) + "|"]
    for m in dict.fromkeys(r["method"] for r in mine):
        cells = []
        for g in grid:
            hit = [r for r in mine if r["method"] == m and r["seed"] == first and r["lr"] == g]
            cells.append("–" if not hit else f"**{100 * hit[0]['val']:.1f}**" if hit[0].get("selected")
                         else f"{100 * hit[0]['val']:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parity(runs: list[dict], task: str) -> list[str]:
    """ammd against TRL: each counterpart pair, and the best of each system.

    "At least as good" means ammd's mean is no lower than TRL's minus the larger of the two
    spreads over seeds (a gap inside the spread is not a difference)."""
    test = by_method(full_runs(runs), task)

    def compare(a: str, b: str) -> str:
        (ma, sa, _), (mb, sb, _) = test[a], test[b]
        ok = ma >= mb - max(sa, sb)
        return (f"{a} {_fmt(ma, sa)} vs {b} {_fmt(mb, sb)}: {100 * (ma - mb):+.1f} points, "
                f"{'at least as good' if ok else '**worse** beyond the spread'}")
    lines = [compare(a, b) for a, b in COUNTERPARTS.items() if a in test and b in test]
    ours = [m for m in test if not is_trl(m)]
    theirs = [m for m in test if is_trl(m)]
    if ours and theirs:
        best = lambda ms: max(ms, key=lambda m: test[m][0])  # noqa: E731
        lines.append("best: " + compare(best(ours), best(theirs)))
    return lines


def usage_table(runs: list[dict], tasks: list[str]) -> str:
    """Rows generated / rows trained on, per source: the worst over seeds, per task and method."""
    lines = ["| task | method | student | teacher | dataset |", "|---|---|---|---|---|"]
    for task in tasks:
        for m in dict.fromkeys(r["method"] for r in runs if r["task"] == task and "rollout_usage" in r):
            use = [r["rollout_usage"] for r in runs if r["task"] == task and r["method"] == m]
            cells = []
            for src in ("student", "teacher", "dataset"):
                ratios = [u[src]["ratio"] for u in use if src in u and u[src]["ratio"] is not None]
                cells.append(f"{max(ratios):.2f}" if ratios else "–")
            lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(runs: list[dict], tasks: list[str]) -> str:
    """Test score of AMM per beta (rows) and task (columns), validation score alongside."""
    head = "| beta | " + " | ".join(f"{t} test | {t} val" for t in tasks) + " |"
    lines = [head, "|---" * (1 + 2 * len(tasks)) + "|"]
    betas = sorted({amm_beta(r["method"]) for r in runs if amm_beta(r["method"]) is not None})
    test = {t: by_method(runs, t) for t in tasks}
    val = {t: by_method(runs, t, "val") for t in tasks}
    top = {t: max(s[0] for m, s in test[t].items() if amm_beta(m) is not None) for t in tasks}
    for beta in betas:
        method = amm_label(beta)
        cells = []
        for t in tasks:
            s = test[t][method]
            cells += [_fmt(*s[:2], bold=s[0] == top[t]), _fmt(*val[t][method][:2])]
        lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(runs: list[dict], task: str) -> str:
    """One honest sentence: the AMM variant best on validation against the best non-AMM method
    (TRL's included), on test, with the spreads over seeds."""
    test = by_method(full_runs(runs), task)
    best = best_amm(runs, task)
    others = {m: s for m, s in test.items() if not is_amm(m)}
    if best is None or not others:
        return f"{task}: nothing to compare."
    rival = max(others, key=lambda m: others[m][0])
    (a, sa, _), (b, sb, _) = test[best], others[rival]
    gap = a - b
    if abs(gap) <= max(sa, sb):
        word = "ties with"
    else:
        word = "beats" if gap > 0 else "loses to"
    return (f"{task}: {best} (the AMM variant best on validation) {word} the best non-AMM "
            f"method, {rival}: {100 * a:.1f} ± {100 * sa:.1f} vs {100 * b:.1f} ± {100 * sb:.1f} "
            f"(difference {100 * gap:+.1f} points; one within the larger spread counts as a tie).")


def variant_table(runs: list[dict], tasks: list[str]) -> str:
    """The ablations (first seed only, one learning rate) beside the full table's AMM variants
    on the same seed: test and validation ×100 per task."""
    seed = min(r["seed"] for r in runs)
    first = [r for r in runs if r["seed"] == seed and is_amm(r["method"])]
    head = "| AMM variant (seed %d) | " % seed + " | ".join(f"{t} test | {t} val | {t} lr" for t in tasks) + " |"
    lines = [head, "|---" * (1 + 3 * len(tasks)) + "|"]
    for m in dict.fromkeys(r["method"] for r in first):
        cells = []
        for t in tasks:
            hit = [r for r in first if r["method"] == m and r["task"] == t]
            cells += ([f"{100 * hit[0]['test']:.1f}", f"{100 * hit[0]['val']:.1f}", f"{hit[0]['lr']:g}"]
                      if hit else ["–"] * 3)
        kind = " (ablation)" if any(r.get("ablation") for r in first if r["method"] == m) else ""
        lines.append(f"| {m}{kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], tasks: list[str], path: Path) -> None:
    """D_on, D_off and the adversary loss over learner steps, per task and AMM variant of the
    full table (mean over seeds). Dashed: the class's true distance at the analytic best
    response (``d_on_true``/``d_off_true``), beside the learned adversary's estimate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("d_on", "on-policy distance D_on"), ("d_off", "off-policy distance D_off"),
            ("adversary_loss", "adversary loss")]
    runs = full_runs(runs)
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        per_method: dict[str, list[list[dict]]] = defaultdict(list)
        for r in runs:
            if r["task"] == task and is_amm(r["method"]) and r.get("curves"):
                per_method[r["method"]].append(r["curves"])
        for j, (key, title) in enumerate(keys):
            ax = axes[i][j]
            for n, (method, curves) in enumerate(per_method.items()):  # one colour per variant
                _plot_mean(ax, curves, key, method, dict(color=f"C{n}"))
                _plot_mean(ax, curves, f"{key}_true", None, dict(color=f"C{n}", linestyle="--"))
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("learner step", fontsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_mean(ax, curves: list[list[dict]], key: str, label: str | None, style: dict) -> None:
    """The seed mean of ``key`` over steps; nothing where the runs did not record it (D_off
    has no off-policy rows at beta 0, D_on no on-policy rows at beta 1)."""
    steps = min(len(c) for c in curves)
    if steps == 0 or any(key not in h for c in curves for h in c[:steps]):
        return
    y = np.mean([[h[key] for h in c[:steps]] for c in curves], axis=0)
    if not np.any(y):
        return
    ax.plot([h["step"] for h in curves[0][:steps]], y, label=label, **style)


def markdown(result: dict, curves_name: str) -> str:
    every = completed(result)
    runs, ablations = full_runs(every), [r for r in every if r.get("ablation")]
    failed = [r for r in result["runs"] if "error" in r]
    tasks = task_order(runs)
    seeds = sorted({r["seed"] for r in runs})
    steps = sorted({r["steps"] for r in runs})
    parts = [f"Produced by `{result['command']}` at commit `{result['commit']}` in "
             f"{result['wall_seconds'] / 60:.1f} min on this machine; {len(every)} runs ({len(ablations)} of them ablations), tasks "
             f"{', '.join(tasks)}, seeds {seeds}, {', '.join(map(str, steps))} learner steps per run "
             f"(overrides: {' '.join(result['overrides']) or 'none'}). Scores are ×100 on the held-out "
             f"test split; bold is the best mean among the distilled students. Each method's "
             f"learning rate (lr) was picked on the validation split of seed {seeds[0]} from the grid "
             f"{result.get('lr_grid', '–')}."]
    for task in tasks:
        parts += [f"#### {task}", task_table(runs, task)]
        if any(is_trl(r["method"]) for r in runs if r["task"] == task):
            parts += ["ammd against TRL (generated):\n\n" + "\n".join(f"- {line}" for line in parity(runs, task))]
    grid = result.get("lr_grid") or []
    if len(grid) > 1:
        parts += ["#### Learning-rate search (validation ×100, first seed; bold = picked)"]
        parts += [f"{task}:\n\n{lr_table(result['runs'], task, grid)}" for task in tasks]
    if any("rollout_usage" in r for r in runs):
        parts += ["#### Rows generated / rows trained on, per source (worst seed)", usage_table(runs, tasks)]
    if len({amm_beta(r["method"]) for r in runs} - {None}) > 1:
        parts += ["#### AMM's beta (0 = on-policy only, 1 = off-policy only)", ablation_table(runs, tasks)]
    if ablations:
        parts += ["#### AMM's ablations (first seed, at the learning rate picked for the AMM variant "
                  "best on that seed's validation; ×100)", variant_table(every, tasks)]
    if any(is_amm(r["method"]) for r in runs):
        parts += [f"![D_on, D_off and adversary loss over steps; dashed: the true distance at the "
                  f"best response]({curves_name})",
                  "#### Where AMM wins and where it does not (generated)",
                  "\n".join(f"- {verdict(runs, t)}" for t in tasks)]
    if failed:
        parts += ["#### Failed runs (left out of the tables)",
                  "\n".join(f"- {r['task']} seed {r['seed']} {r['method']}: {r['error']}" for r in failed)]
    return "\n\n".join(parts)


def write_outputs(result: dict, out_dir: Path, benchmarks_md: Path | None = None) -> str:
    """Write quality.json, quality_curves.png and quality.md under ``out_dir``; update BENCHMARKS.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1))
    runs = completed(result)
    plot_curves(runs, task_order(runs), out_dir / "quality_curves.png")
    rel = "quality_curves.png"
    if benchmarks_md is not None:
        rel = str((out_dir / "quality_curves.png").resolve().relative_to(benchmarks_md.resolve().parent))
    text = markdown(result, rel)
    (out_dir / "quality.md").write_text(text + "\n")
    if benchmarks_md is not None:
        doc = benchmarks_md.read_text()
        if BEGIN not in doc:
            raise ValueError(f"{benchmarks_md} has no '{BEGIN}' ... '{END}' markers for the quality section")
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        benchmarks_md.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return text


def reproduction_table(first: dict, second: dict) -> str:
    """Per task and method: both runs' test mean ± std and whether the means agree within spread.

    "Within" means |mean1 - mean2| <= std1 + std2 (each std is over the seeds of its run).
    """
    lines = ["| task | method | first run | re-run | difference | within spread |", "|---|---|---|---|---|---|"]
    ok = total = 0
    a_runs, b_runs = completed(first), completed(second)
    for task in task_order(b_runs):
        a, b = by_method(a_runs, task), by_method(b_runs, task)
        for method in (m for m in b if m in a):
            gap = b[method][0] - a[method][0]
            inside = abs(gap) <= a[method][1] + b[method][1]
            ok, total = ok + inside, total + 1
            lines.append(f"| {task} | {method} | {_fmt(*a[method][:2])} | {_fmt(*b[method][:2])} | "
                         f"{100 * gap:+.1f} | {'yes' if inside else '**no**'} |")
    return "\n".join(lines) + f"\n\n{ok} of {total} method means agree within the summed spread."


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Render or compare quality.json files of bench.quality")
    sub = ap.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="tables, curves and (optionally) the BENCHMARKS.md section")
    render.add_argument("result")
    render.add_argument("--benchmarks-md", default=None)
    compare = sub.add_parser("compare", help="does a re-run reproduce each method's mean within the spread?")
    compare.add_argument("first")
    compare.add_argument("second")
    args = ap.parse_args(argv)
    if args.command == "render":
        path = Path(args.result)
        write_outputs(json.loads(path.read_text()), path.parent, args.benchmarks_md and Path(args.benchmarks_md))
    else:
        print(reproduction_table(json.loads(Path(args.first).read_text()),
                                 json.loads(Path(args.second).read_text())))


if __name__ == "__main__":
    main()
