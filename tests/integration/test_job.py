"""The whole job for real: ``ammd run`` with embedded Ray, vLLM rollouts, DeepSpeed learners.

A short run per staleness bound (0 = synchronous, 1 = one version behind), watched through
the status endpoint while it runs, then judged by its report. The AMM run loses its student
rollout actor mid-job (its process killed by pid) and must finish all the same; the other
run's exported student must decode, in plain transformers, what the rollout actor decoded.
"""
import signal
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from learner.learner_actor import free_port
from tests.tb_events import read_scalars

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def get_text(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def check_metrics(text: str, staleness: int, loss: str) -> None:
    """/metrics of the running job, read with prometheus_client's parser: each family once, the
    measurements only a real job makes (rollout actors' tokens/s, weight pushes, sampled row
    age) present and plausible."""
    from tests.unit.test_metrics import parse, values

    m = parse(text)
    rates = values(m, "ammd_rollout_actor_tokens_per_second", "actor")
    assert rates["student-0"] > 0 and rates["teacher-0"] > 0, rates
    assert m["ammd_weight_pushes"]["samples"][("ammd_weight_pushes_total", ())] >= 2  # version 0, then 1
    assert m["ammd_weight_push_seconds"]["samples"][("ammd_weight_push_seconds", ())] > 0
    age = values(m, "ammd_sampled_row_age_versions", "stat")
    assert 0 <= age["mean"] <= age["max"] <= staleness, age
    states = values(m, "ammd_job_state", "state")  # read while training, or just as it finished
    assert sum(states.values()) == 1.0 and states["training"] + states["finished"] == 1.0, states
    terms = set(values(m, "ammd_loss", "term"))
    assert {"loss", "lr", "grad_norm"} <= terms and (loss != "amm" or {"d_on", "d_off", "adversary_loss"} <= terms)


@pytest.mark.parametrize("staleness,loss", [(0, "forward_kl"), (1, "amm")])
def test_short_job_trains_syncs_and_reports(toy_world, tmp_path, staleness, loss):
    port = free_port()
    ammd = Path(sys.executable).with_name("ammd")
    cmd = [str(ammd), "run", "configs/local-cpu.yaml", f"name=job-s{staleness}",
           f"output_dir={tmp_path}", "learner.steps=12", "learner.sync_every=4",
           f"buffer.max_staleness={staleness}", f"status.port={port}", "data.eval_size=50",
           "rollout.prompts_per_batch=32", "learner.save_every=12", "eval.every=6",
           f"loss.name={loss}"]
    env = {**os.environ}
    log = (tmp_path / "job.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen, killed, before_kill, metrics = None, None, None, None
    deadline = time.time() + 420
    while proc.poll() is None and time.time() < deadline:
        snap = get_json(f"http://127.0.0.1:{port}/status")
        if snap and snap["step"] >= 1 and seen is None:
            seen = snap
            assert get_json(f"http://127.0.0.1:{port}/healthz")["status"] == "ok"
        if snap and snap["step"] >= 5 and snap["state"] == "training":  # after the push of step 4
            metrics = get_text(f"http://127.0.0.1:{port}/metrics") or metrics
        pid = snap and snap["actors"].get("student-0", {}).get("pid")
        if loss == "amm" and killed is None and snap and snap["step"] >= 3 and pid:
            before_kill = snap["buffer"]["appended_by_source"]
            os.kill(pid, signal.SIGKILL)  # the real vLLM process, mid-job
            killed = pid
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    text = (tmp_path / "job.log").read_text()
    assert proc.wait() == 0, text[-3000:]
    assert seen is not None, "the status endpoint never showed a training step"
    assert metrics is not None, "/metrics was never read after the first push"
    check_metrics(metrics, staleness, loss)
    for key in ("step", "weight_version", "buffer", "rollout_tokens_per_s", "learner_tokens_per_s",
                "losses", "actors"):
        assert key in seen, key
    assert "loss" in seen["losses"] and set(seen["buffer"]["rows_by_source"]) >= {"student", "teacher"}
    assert {"student-0", "teacher-0", "learner-0", "learner-1", "buffer"} <= set(seen["actors"])

    report = json.loads((tmp_path / f"job-s{staleness}" / "report.json").read_text())
    assert report["steps"] == 12 and report["final_weight_version"] == 3
    assert report["rows_by_source"]["student"] > 0 and report["rows_by_source"]["teacher"] > 0
    assert report["config"]["buffer"]["max_staleness"] == staleness
    for key in ("metric", "teacher_score", "student_score_before", "student_score_after", "wall_seconds"):
        assert key in report
    assert report["teacher_score"] > report["student_score_before"]
    assert 0 < report["seconds_to_first_step"] < report["wall_seconds"]
    assert "step 12/12" in text  # progress was shown
    # It ends with the short table (cluster.report.ending), not the report's JSON.
    after = f"{report['student_score_before']:.3f} -> {report['student_score_after']:.3f}"
    assert f"ammd run job-s{staleness}: done" in text and after in text, text[-2000:]
    assert '"final_weight_version"' not in text
    # Every on-policy row the learner used was at most `staleness` versions old.
    assert report["max_on_policy_lag"] <= staleness
    assert [e["step"] for e in report["evals"]] == [6, 12]
    # Rollouts sized by demand: every source's rows were trained on, none thrown away.
    usage = report["rollout_usage"]
    assert set(usage) == {"student", "teacher"}
    for src, use in usage.items():
        assert use["trained"] == 12 * 16 and 1.0 <= use["ratio"] <= 1.2, (src, use)
    assert seen["rollout_usage"]  # /status shows it while the job runs
    # The default schedule decays linearly from learner.lr to 0 over the 12 steps.
    rates = [h["lr"] for h in report["history"]]
    np.testing.assert_allclose(rates, [1e-3 * (1 - t / 12) for t in range(12)], rtol=1e-6)
    run_dir = tmp_path / f"job-s{staleness}"
    ckpt = run_dir / "checkpoints" / "step-000012"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000012"
    assert report["last_checkpoint"] == str(ckpt) and report["student_dir"] == str(run_dir / "student")
    import torch
    state = torch.load(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False,
                       map_location="cpu")
    assert state["lr_scheduler"]["last_epoch"] == 12  # the scheduler is saved with the optimiser
    if loss == "forward_kl":
        check_tensorboard(report, run_dir)
    if loss == "amm":
        # The adversaries' curves are in the report and their state in the checkpoint.
        assert all({"d_on", "d_off", "adversary_loss"} <= set(h) for h in report["history"])
        extra = torch.load(ckpt / "deepspeed" / "rank0-extra.pt", weights_only=False)
        assert len(extra["objective"]["heads"]) == 2 and "state" in extra["objective"]["optimizer"]
    if loss == "amm":
        # The killed student actor was restarted; every acknowledged row is still counted.
        assert killed is not None, "the student actor was never killed"
        assert report["restarts"] == {"student-0": 1} and "student-0 died" in text
        appended = report["buffer_appended_by_source"]
        assert all(appended[s] >= n for s, n in before_kill.items())
        assert {s: u["generated"] for s, u in usage.items()} == {s: appended[s] for s in usage}
    else:
        check_exported_student(report, run_dir)


def check_tensorboard(report, run_dir):
    """The job's TensorBoard event files hold report.json's history, every value of every step
    exactly, and the /metrics scalars of each step."""
    scalars = read_scalars(run_dir / "tb")
    keys = set(report["history"][0]) - {"step"}
    assert {"loss", "grad_norm", "lr"} <= keys
    for key in keys:
        assert scalars[f"train/{key}"] == {h["step"]: h[key] for h in report["history"]}, key
    assert scalars["ammd_step"] == {s: float(s) for s in range(1, 13)}
    assert scalars["ammd_loss/term=loss"] == scalars["train/loss"]  # the snapshot after each step
    assert scalars["ammd_weight_version"][12] == report["final_weight_version"]


def check_exported_student(report, run_dir):
    """The exported student, loaded fresh, decodes greedily what the rollout actor decoded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.chat import ChatFormat
    from cluster.data import load_prompts
    from tasks.scoring import score

    cfg = report["config"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    fmt = ChatFormat(tok, None, None, (tok.eos_token_id,))  # the toy tokenizer has no chat template
    prompts = load_prompts(cfg["data"]["eval"], fmt, cfg["data"]["max_prompt_tokens"], limit=cfg["data"]["eval_size"])
    texts = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p.ids]), max_new_tokens=cfg["data"]["max_response_tokens"],
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(out[0, len(p.ids):], skip_special_tokens=True).strip())
    assert [e["output"] for e in report["examples_after"]] == texts[:len(report["examples_after"])]
    assert score(cfg["eval"]["metric"], texts, [p.reference for p in prompts]) == report["student_score_after"]
