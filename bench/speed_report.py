"""The speed benchmark's outputs: speed.json, speed.md, and its section of BENCHMARKS.md.

``markdown(result)`` renders every part of ``bench/speed.py``'s result as tables (each figure
with both absolute numbers and their ratio, the target and whether it was met) under one line
naming the command, the commit and the machine; ``write_outputs`` writes it between the
``<!-- speed:begin -->`` / ``<!-- speed:end -->`` markers of BENCHMARKS.md, leaving the
hand-written reading after them untouched.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
GPU = "not measured"
SMOKE_NOTE = " - a SMOKE run: tiny models, a few steps; its numbers say nothing about speed"


def _ok(part: dict) -> bool:
    return isinstance(part, dict) and "error" not in part


def collect_ratios(result: dict) -> dict[str, float]:
    """Every ratio the run measured, flat: ``{name: value}`` (absent where a part failed)."""
    ratios: dict[str, float] = {}
    if _ok(result.get("rollout")):
        ratios["a_vllm_over_hf_generate_tokens_per_s"] = result["rollout"]["ratio"]
    if _ok(result.get("weight_push")):
        for size in result["weight_push"]["sizes"]:
            for name, t in size.get("transports", {}).items():
                if "ratio_to_memcpy" in t:
                    ratios[f"b_{size['name']}_{name}_push_over_memcpy_s"] = t["ratio_to_memcpy"]
    if _ok(result.get("overlap")):
        for r in result["overlap"]["runs"]:
            if r["max_staleness"]:
                key = f"c_staleness{r['max_staleness']}_over_sync_student_tokens_per_s"
                ratios[key] = r["student_tokens_vs_sync"]
    for scale, e in result.get("e2e", {}).items():
        if _ok(e):
            ratios[f"d_{scale}_ammd_over_trl_steps_per_s"] = e["ratio_steps"]
            ratios[f"d_{scale}_ammd_over_trl_tokens_per_s"] = e["ratio_tokens"]
    if _ok(result.get("status_load")):
        ratios["f_loaded_over_unloaded_steps_per_s"] = result["status_load"]["ratio"]
    if _ok(result.get("memory")):
        for r in result["memory"]["rows"]:
            if r["config"] != "forward_kl":
                ratios[f"e_{r['config']}_over_forward_kl_peak_memory"] = r["ratio_to_forward_kl"]
    return ratios


def _m(params: int) -> str:
    return f"{params / 1e6:.1f}M"


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _met(flag: bool) -> str:
    return "**met**" if flag else "**missed**"


def _failed(part: Any) -> list[str]:
    return [f"Not measured: {part['error'].splitlines()[0][:400] if isinstance(part, dict) else 'did not run'}"]


def _rollout(a: dict, student_params: int) -> list[str]:
    lines = [f"#### (a) Rollout: vLLM against transformers `generate` (student, {_m(student_params)})", ""]
    if not _ok(a):
        return lines + _failed(a)
    lines += [f"{a['prompts']} prompts in one batch, temperature 1 over the whole vocabulary, at most "
              f"{a['max_tokens']} new tokens, a stop set of {a['stop_ids']} token ids (1 in {a['stop_every']}) "
              f"ending responses early; {a['dtype']}, {a['threads']} thread per engine actor; median of "
              f"{a['repeats']} timed runs after a warm-up.", "",
              "| engine | tokens/s (CPU) | each run | mean response tokens | GPU |", "|---|---|---|---|---|"]
    for key, label in (("vllm", "vLLM (`rollout/vllm_engine.py` in the student rollout actor)"),
                       ("hf_generate", "transformers `generate` (one batched call, KV cache)")):
        e = a[key]
        lines.append(f"| {label} | {_n(e['tokens_per_s'])} | {', '.join(_n(x) for x in e['runs_tokens_per_s'])} "
                     f"| {e['mean_response_tokens']} | {GPU} |")
    return lines + ["", f"vLLM / transformers: **{a['ratio']:.2f}x** (target >= {a['target']}x: {_met(a['met'])})"]


def _push(b: dict) -> list[str]:
    lines = ["#### (b) Weight push: learner rank to the vLLM student actor, against one memcpy", ""]
    if not _ok(b):
        return lines + _failed(b)
    names = list(dict.fromkeys(t for s in b["sizes"] for t in s.get("transports", {})))  # registry order
    head = "| model | parameters | bytes | memcpy (floor) | " + " | ".join(f"{t} push | x memcpy" for t in names)
    lines += [f"Median of {b['repeats']} pushes after a warm-up push; a push is `Trainer.push_weights` until "
              f"the student has loaded it. Transports: every one in `learner.weight_sync.TRANSPORTS`.", "",
              head + " | object_store: learner export + rollout load | GPU |",
              "|---" * (6 + 2 * len(names)) + "|"]
    for s in b["sizes"]:
        if "skipped" in s:
            lines.append(f"| {s['name']} | {_m(s['params'])} | skipped: {s['skipped']} |")
            continue
        cells = []
        for t in names:
            r = s["transports"].get(t, {"skipped": "not registered"})
            cells += ([f"{r['push_s']:.3f} s", f"{r['ratio_to_memcpy']:.1f}x"] if "push_s" in r
                      else [f"skipped: {r['skipped'][:120]}", "-"])
        split = s["object_store_split"]
        lines.append(f"| {s['name']} | {_m(s['params'])} | {s['bytes'] / 2**20:,.1f} MiB | "
                     f"{s['memcpy_s']:.3f} s | {' | '.join(cells)} | {split['learner_export_s']:.3f} s + "
                     f"{split['rollout_load_s']:.3f} s | {GPU} |")
    firsts = [f"{s['name']} {t} {r['first_push_s']:.2f} s" for s in b["sizes"]
              for t, r in s.get("transports", {}).items() if "first_push_s" in r]
    best = ", ".join(f"{k} {v:.1f}x" for k, v in b["best_ratio_at_100M_up"].items()) or "no size of 100M+ measured"
    return lines + ["", f"First (warm-up) pushes: {'; '.join(firsts)}.", "",
                    f"Target: push within {b['target']:.0f}x of one memcpy at >= 100M parameters: "
                    f"{_met(b['met'])} (best transport: {best})."]


def _overlap(c: dict) -> list[str]:
    lines = ["#### (c) Async overlap: the job at buffer.max_staleness 0, 1, 2 (realistic pair)", ""]
    if not _ok(c):
        return lines + _failed(c)
    r0 = c["runs"][0]
    lines += [f"Each run: `cluster.driver.run_job`, GKD mix (JSD 0.5, student samples + dataset responses), "
              f"{r0['steps']} learner steps of {r0['batch']} rows, a weight push after every step; timed over "
              f"the training loop.", "",
              "| max_staleness | loop s | learner steps/s | learner busy | student tokens/s | x synchronous | "
              "student busy | max lag | GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in c["runs"]:
        lines.append(f"| {r['max_staleness']} | {r['loop_seconds']:.1f} | {r['learner_steps_per_s']:.3f} | "
                     f"{r['learner_busy_fraction']:.0%} | {_n(r['student_tokens_per_s'])} | "
                     f"{r['student_tokens_vs_sync']:.2f}x | {r['student_busy_fraction']:.0%} | "
                     f"{r['max_on_policy_lag']} | {GPU} |")
    one = next(r for r in c["runs"] if r["max_staleness"] == 1)
    return lines + ["", f"Staleness 1 against the synchronous loop: **{c['ratio']:.2f}x** student tokens/s with "
                        f"the learner busy {one['learner_busy_fraction']:.0%} (target >= {c['target']}x with "
                        f"busy >= {c['target_busy']:.0%}: {_met(c['met'])})"]


def _e2e(d: dict, models: dict) -> list[str]:
    lines = ["#### (d) End to end: ammd's job against TRL's GKDTrainer (lambda 0.5, beta 0.5)", "",
             "Same pair, data, batch, temperature and new-token cap; ammd at max_staleness 1 over its training "
             "loop, TRL over its `train_runtime`, alone on the machine; tokens = response tokens trained on.",
             "", "| scale | system | steps | batch | steps/s | trained tokens/s | GPU |", "|---" * 7 + "|"]
    verdicts = []
    for scale, e in d.items():
        what = (f"realistic ({_m(models['student']['params'])} student, {_m(models['teacher']['params'])} teacher)"
                if scale == "realistic" else "toy (summarize)")
        if not _ok(e):
            lines.append(f"| {what} | {_failed(e)[0]} | | | | | |")
            continue
        a = e["ammd"]
        lines.append(f"| {what} | ammd | {a['steps']} | {a['batch']} | {a['learner_steps_per_s']:.3f} | "
                     f"{_n(a['learner_tokens_per_s'])} | {GPU} |")
        for t in e["trl"]:
            lines.append(f"| | TRL GKDTrainer, {t['threads']} thread(s) | {t['steps']} | {t['batch']} | "
                         f"{t['steps_per_s']:.3f} | {_n(t['tokens_per_s'])} | {GPU} |")
        verdicts.append(f"{scale}: **{e['ratio_steps']:.2f}x** steps/s, {e['ratio_tokens']:.2f}x tokens/s against "
                        f"TRL at {e['trl_threads_compared']} thread(s) ({_met(e['met'])})")
    return lines + ["", "ammd / TRL (target >= 1x): " + "; ".join(verdicts)]


def _memory(e: dict | None) -> list[str]:
    lines = ["#### (e) AMM's peak memory per learner rank against forward KL's, at a 128k vocabulary", ""]
    if e is None:
        return lines + ["Not run."]
    if not _ok(e):
        return lines + _failed(e)
    sh = e["shape"]
    lines += [f"`{e['command']}`: one learner step per loss in a fresh subprocess, CPU fp32, a "
              f"Llama-architecture student (hidden {sh['hidden']}, vocabulary {sh['vocab']:,}, {sh['layers']} "
              f"layer), {sh['rows']} rows x {sh['response']} response tokens, low-rank heads at rank {sh['rank']}; "
              f"peak resident memory above the imports, what one rank holds without ZeRO.", "",
              "| loss | adversary parameters | peak (MiB) | / forward KL | GPU |", "|---|---:|---:|---:|---|"]
    for r in e["rows"]:
        label = {"forward_kl": "forward KL", "amm_default": f"AMM, default head (`{e['default_head']}`)"}.get(
            r["config"], f"AMM, `head={r['config'].removeprefix('amm_')}`")
        lines.append(f"| {label} | {r['head_params']:,} | {_n(r['peak_mib'])} | {r['ratio_to_forward_kl']:.2f} | "
                     f"{GPU} |")
    return lines + ["", f"Default AMM / forward KL: **{e['ratio']:.2f}x** (target <= {e['target']}x: {_met(e['met'])})"]


def _status_load(f: dict | None) -> list[str]:
    lines = ["#### (f) Watching a job: steps/s under status requests (toy pair)", ""]
    if f is None:
        return lines + ["Not run."]
    if not _ok(f):
        return lines + _failed(f)
    lines += [f"The same `cluster.driver.run_job` alternately without requests and with {f['rate']:g} GETs/s "
              f"of `/status` and `/metrics` from a client thread, on shared rollout actors; timed over the "
              f"training loop.", "", "| run | status requests | requests answered | loop s | learner steps/s |",
              "|---|---|---:|---:|---:|"]
    for i, r in enumerate(f["runs"], 1):
        lines.append(f"| {i} | {'%g/s' % f['rate'] if r['loaded'] else 'none'} | {r['requests_answered']} | "
                     f"{r['loop_seconds']:.1f} | {r['steps_per_s']:.3f} |")
    return lines + ["", f"Loaded / unloaded: **{f['ratio']:.3f}x** steps/s (target >= {f['target']}x, a slowdown "
                        f"of at most 5%: {_met(f['met'])})"]


def markdown(result: dict) -> str:
    m = result["machine"]
    head = (f"Produced by `{result['command']}` at commit `{result['commit']}` in "
            f"{result['wall_seconds'] / 60:.1f} min on this machine ({m['cpu']}, {m['cores']} cores, "
            f"{m['ram_gib']} GiB RAM){SMOKE_NOTE if result['smoke'] else ''}. "
            f"Rollout engines in {m['dtype']}: {m['reason']}. Learners in fp32, ammd's and TRL's. "
            f"GPU columns: {m['gpu']}. Raw numbers: `speed.json`.")
    student = result["models"]["student"]["params"]
    parts = [[head], _rollout(result["rollout"], student), _push(result["weight_push"]), _overlap(result["overlap"]),
             _e2e(result.get("e2e", {}), result["models"]), _memory(result.get("memory")),
             _status_load(result.get("status_load"))]
    return "\n\n".join("\n".join(p) for p in parts)


def write_outputs(result: dict, out_dir: Path, benchmarks_md: Path | None = None) -> str:
    """Write speed.json and speed.md under ``out_dir``; rewrite BENCHMARKS.md's speed section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out_dir / "speed.md").write_text(text + "\n")
    if benchmarks_md is not None:
        doc = benchmarks_md.read_text()
        if BEGIN not in doc or END not in doc:
            raise ValueError(f"{benchmarks_md} has no '{BEGIN}' ... '{END}' markers for the speed section")
        head, rest = doc.split(BEGIN, 1)
        benchmarks_md.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return text
