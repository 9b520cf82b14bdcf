"""Bad checkpoints and resumes end in one line on stderr that names the problem and the fix, and
exit code 2, before Ray or any actor starts (the fixture ``no_ray``, tests/integration/conftest.py, fails the test otherwise):
nothing to resume, a damaged or tampered checkpoint (verified against its checksums before
anything of it is read), a config or model that differs from the checkpoint's, and ``ammd
export`` of what is no checkpoint. The helpers are test_user_errors.py's; docs/errors.md lists
every case, one row per test id.
"""
import json
import shutil

import pytest

from tests.integration.test_user_errors import CONFIG, assert_one_error, own, run_cli

pytestmark = pytest.mark.slow


def resolved(args):
    """The config dump ``run`` compares a checkpoint with, for ``ammd run CONFIG *args``."""
    from cluster.config import load_config
    from cluster.driver import resolve_inputs
    return resolve_inputs(load_config(CONFIG, args)).model_dump()


def fake_checkpoint(run_dir, config, step=4):
    """A checkpoint as far as resume and export read it before any actor starts."""
    from cluster import checkpoint
    ckpt = run_dir / "checkpoints" / checkpoint.step_name(step)
    ckpt.mkdir(parents=True)
    fingerprints = {role: checkpoint.fingerprint(config["models"][role]) for role in ("teacher", "student")}
    (ckpt / "driver.json").write_text(json.dumps({"config": config, "fingerprints": fingerprints,
                                                  "trainer": {"step": step}}))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    checkpoint.seal(ckpt)  # as commit does: its checksums, written last
    return ckpt


def test_resume_a_run_that_does_not_exist(capsys, toy_world, tmp_path, no_ray):
    rc, err = run_cli(capsys, "run", CONFIG, *own(toy_world, f"output_dir={tmp_path}", "name=nope"),
                      "--resume")
    assert_one_error(rc, err, f"nothing to resume: {tmp_path / 'nope'} does not exist",
                     "run without --resume")


@pytest.mark.parametrize("layout", ["only-unfinished-tmp-checkpoint", "latest-points-at-incomplete-dir"])
def test_resume_without_a_complete_checkpoint(capsys, toy_world, tmp_path, no_ray, layout):
    root = tmp_path / "job" / "checkpoints"
    if layout == "only-unfinished-tmp-checkpoint":
        (root / ".tmp-step-000004").mkdir(parents=True)
    else:
        (root / "step-000004").mkdir(parents=True)
        (root / "latest").write_text("step-000004")
    rc, err = run_cli(capsys, "run", CONFIG, *own(toy_world, f"output_dir={tmp_path}", "name=job"),
                      "--resume")
    assert_one_error(rc, err, "nothing to resume", "no complete checkpoint under", "learner.save_every",
                     "run without --resume")


def test_resume_from_a_damaged_checkpoint(capsys, toy_world, tmp_path, no_ray):
    args = own(toy_world, f"output_dir={tmp_path}", "name=job")
    ckpt = fake_checkpoint(tmp_path / "job", resolved(args))
    (ckpt / "driver.json").write_text('{"config": {"seed": ')  # cut off mid-write
    rc, err = run_cli(capsys, "run", CONFIG, *args, "--resume")
    assert_one_error(rc, err, f"checkpoint {ckpt} is damaged", "driver.json differs from its checksum",
                     "start over without --resume")


CHECKPOINT_TAMPERING = {
    "no-checksums": (lambda ckpt: (ckpt / "checksums.json").unlink(), ["has no checksums.json",
                                                                      "cannot be verified before"]),
    "unlisted-file": (lambda ckpt: (ckpt / "deepspeed").mkdir() or (ckpt / "deepspeed" / "evil.pt").write_bytes(b"x"),
                      ["holds files its checksums.json does not list (deepspeed/evil.pt)", "is not loaded"]),
}


@pytest.mark.parametrize("command", ["run", "export"])
@pytest.mark.parametrize("case", ["no-checksums", "unlisted-file", "buffer-manifest-damaged"])
def test_a_checkpoint_is_verified_before_anything_of_it_is_read(capsys, toy_world, tmp_path, no_ray,
                                                                 command, case):
    """Issue 21: checkpoints were unpickled unverified (a crafted one ran its payload via export)."""
    from cluster import checkpoint
    args = own(toy_world, f"output_dir={tmp_path}", "name=job")
    ckpt = fake_checkpoint(tmp_path / "job", resolved(args))
    if case == "buffer-manifest-damaged":
        (ckpt / "buffer").mkdir()
        (ckpt / "buffer" / "manifest.json").write_text('{"segments": []}')
        checkpoint.seal(ckpt)
        (ckpt / "buffer" / "manifest.json").write_text('{"segm')  # damaged after it was written
        words = ["is damaged", "buffer/manifest.json differs from its checksum"]
    else:
        tamper, words = CHECKPOINT_TAMPERING[case]
        tamper(ckpt)
    if command == "run":
        rc, err = run_cli(capsys, "run", CONFIG, *args, "--resume")
    else:
        rc, err = run_cli(capsys, "export", str(tmp_path / "job"), "--out", str(tmp_path / "out"))
    assert_one_error(rc, err, f"checkpoint {ckpt}", *words)


def test_resume_with_a_different_config(capsys, toy_world, tmp_path, no_ray):
    args = own(toy_world, f"output_dir={tmp_path}", "name=job")
    fake_checkpoint(tmp_path / "job", resolved(args))
    rc, err = run_cli(capsys, "run", CONFIG, *args, "learner.steps=400", "learner.lr=0.002", "--resume")
    assert_one_error(rc, err, "cannot resume", "learner.steps: checkpoint 300, now 400",
                     "learner.lr: checkpoint 0.001, now 0.002", "Resume with the checkpoint's settings")


def test_resume_after_the_students_tokenizer_changed(capsys, toy_world, tmp_path, no_ray):
    student = tmp_path / "student"
    shutil.copytree(toy_world.student_dir, student)
    args = [f"models.teacher={toy_world.teacher_dir}", f"models.student={student}",
            f"data.train={toy_world.train_path}", f"output_dir={tmp_path}", "name=job"]
    fake_checkpoint(tmp_path / "job", resolved(args))
    tok = json.loads((student / "tokenizer.json").read_text())
    (student / "tokenizer.json").write_text(json.dumps(tok))  # same vocabulary, other bytes
    rc, err = run_cli(capsys, "run", CONFIG, *args, "--resume")
    assert_one_error(rc, err, "cannot resume", "the student model's tokenizer.json changed since the "
                     "checkpoint", "start a new run under another name")


def test_export_a_path_that_does_not_exist(capsys, tmp_path):
    rc, err = run_cli(capsys, "export", str(tmp_path / "runs" / "nope"), "--out", str(tmp_path / "out"))
    assert_one_error(rc, err, "does not exist", "give a run directory (runs/<name>)")


def test_export_a_directory_without_checkpoint(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    rc, err = run_cli(capsys, "export", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert_one_error(rc, err, "holds no complete checkpoint", "learner.save_every")
    assert not (tmp_path / "out").exists()


def test_export_a_checkpoint_without_deepspeed_state(capsys, toy_world, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "job", resolved(own(toy_world)))
    rc, err = run_cli(capsys, "export", str(tmp_path / "job"), "--out", str(tmp_path / "out"))
    assert_one_error(rc, err, f"checkpoint {ckpt} is incomplete", "no DeepSpeed state",
                     "export another checkpoint")
    assert not (tmp_path / "out").exists()


def test_export_over_a_directory_that_is_not_a_model(capsys, toy_world, tmp_path):
    fake_checkpoint(tmp_path / "job", resolved(own(toy_world)))
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, err = run_cli(capsys, "export", str(tmp_path / "job"), "--out", str(out))
    assert_one_error(rc, err, f"--out {out} is a directory that holds other files and no model",
                     "give a new or empty directory")
    assert (out / "notes.txt").read_text() == "keep me"
