"""The ``ammd`` command.

  ammd run CONFIG [a.b=c ...] [--resume]
                                  run a distillation job (embedded Ray, or the cluster in
                                  RAY_ADDRESS / ray.address, e.g. under `ray job submit`);
                                  --resume continues runs/<name> from its newest checkpoint
  ammd export RUN_OR_CHECKPOINT --out DIR
                                  write a checkpoint's student as a Hugging Face model dir
  ammd check CONFIG [a.b=c ...] [--config-only] [--resume]
                                  validate the config, models and data and print the
                                  resources the job needs; start nothing
  ammd init-student TEACHER --layers N --out DIR
                                  make a student from a teacher by depth pruning: N evenly
                                  spaced layers, the teacher's embeddings, head, tokenizer
  ammd toy [--root DIR]           build (or find cached) the tiny teacher, student and data
  ammd status [URL] [--watch S] [--json]
                                  a running job's step, throughput, losses, evaluation and
                                  actors' health, read from its status endpoint
                                  (default http://127.0.0.1:8000)

User errors (usage, config, data, models, checkpoints, a status URL that does not answer) end
in one line on stderr and exit code 2; a job that loses an actor it cannot replace ends in one line and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from cluster.checkpoint import CheckpointError
from cluster.config import ConfigError, load_config
from cluster.data import DataError
from cluster.errors import first_line, one_line
from cluster.init_student import InitStudentError
from cluster.models import ModelError
from cluster.report import ending
from cluster.status_view import StatusUnavailable
from cluster.supervisor import ActorLostError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, StatusUnavailable, InitStudentError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other user error) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"ammd: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ammd", description="adversarial moment-matching distillation")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run a distillation job"), ("check", "validate config, models and data")):
        s = sub.add_parser(name, help=text)
        s.add_argument("config", help="YAML config, e.g. configs/local-cpu.yaml")
        s.add_argument("overrides", nargs="*", default=[], help="a.b=c overrides, e.g. learner.steps=50")
        s.add_argument("--resume", action="store_true",
                       help="continue runs/<name> from its newest complete checkpoint" if name == "run"
                       else "check the checkpoint a --resume would continue from too")
        if name == "check":
            s.add_argument("--config-only", action="store_true",
                           help="check the config and print the resources it needs, without "
                                "opening models or data (e.g. a GPU recipe on a laptop)")
    e = sub.add_parser("export", help="write a checkpoint's student as a Hugging Face model dir")
    e.add_argument("path", help="a run directory (its newest checkpoint) or one checkpoint directory")
    e.add_argument("--out", required=True, help="the model directory to write")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: the checkpoint's rollout.dtype)")
    w = sub.add_parser("status", help="show a running job's state, read from its status endpoint")
    w.add_argument("url", nargs="?", default=None,
                   help="the job's status URL (default http://127.0.0.1:8000; host:port works too)")
    w.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="redraw every SECONDS until the job finishes or fails (Ctrl-C stops)")
    w.add_argument("--json", action="store_true", help="print /status as JSON instead")
    i = sub.add_parser("init-student", help="make a student from the teacher: keep N of its layers")
    i.add_argument("teacher", metavar="TEACHER", help="the teacher's Hugging Face model directory")
    i.add_argument("--layers", type=int, required=True, metavar="N",
                   help="decoder layers to keep, evenly spaced, first and last among them")
    i.add_argument("--out", required=True, metavar="DIR",
                   help="the new model directory to write (must not exist, or be empty)")
    t = sub.add_parser("toy", help="build the tiny toy teacher, student and data (cached)")
    t.add_argument("--root", default="artifacts/toy")
    t.add_argument("--task", default="sort")
    t.add_argument("--seed", type=int, default=0)
    return p


def _check(config: str, overrides: list[str], config_only: bool = False, resume: bool = False) -> None:
    """What ``ammd run`` would refuse, refused here the same way (cluster.preflight); starts nothing."""
    from cluster.plan import describe_plan
    from cluster.preflight import check_inputs

    cfg = load_config(config, overrides)
    print(f"config {config} is valid; the job asks for:\n{describe_plan(cfg)}")
    if config_only:
        print(f"models ({cfg.models.teacher}, {cfg.models.student}) and data not opened (--config-only)")
        return
    inputs = check_inputs(cfg, resume)
    # check_inputs has logged the stop tokens and the prompt format already.
    print(f"ok: {len(inputs.train)} prompts, {len(inputs.evals)} evaluation prompts, vocab "
          f"{inputs.pair.vocab_size}, loss {cfg.loss.name}"
          + (f", resumes {inputs.resume_from}" if inputs.resume_from else ""))


def _status(url: str | None, watch: float | None, as_json: bool) -> None:
    from cluster.status_view import DEFAULT_URL, fetch, render

    url = url or DEFAULT_URL
    if watch is not None and watch <= 0:
        raise StatusUnavailable(f"--watch {watch:g}: give a positive number of seconds, e.g. --watch 5")
    try:
        while True:
            snap, health = fetch(url)
            if as_json:
                print(json.dumps(snap, indent=2))
            else:
                if watch is not None and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")  # clear the screen: a live view, not a scroll
                print(render(snap, health), flush=True)
            if watch is None or snap.get("state") in ("finished", "failed"):
                return
            time.sleep(watch)
    except KeyboardInterrupt:  # the way out of --watch: no traceback
        return


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # argparse ends a positional list at the first flag: `check CONFIG --config-only a.b=c`
    # leaves a.b=c over. Overrides may sit on either side of a flag.
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        if args.command == "run":
            from cluster.driver import run_job
            hint = shlex.join(["ammd", "run", args.config, *args.overrides, "--resume"])
            cfg = load_config(args.config, args.overrides)
            report = run_job(cfg, resume=args.resume, resume_hint=hint)
            print(ending(report, Path(cfg.output_dir).resolve() / cfg.name))
        elif args.command == "check":
            _check(args.config, args.overrides, args.config_only, args.resume)
        elif args.command == "status":
            _status(args.url, args.watch, args.json)
        elif args.command == "init-student":
            from cluster.init_student import describe, init_student
            print(describe(init_student(args.teacher, args.layers, args.out)))
        elif args.command == "export":
            from cluster.export import export_checkpoint
            print(export_checkpoint(args.path, args.out, args.dtype))
        else:
            from tasks.build import build_toy_world
            world = build_toy_world(Path(args.root), task=args.task, seed=args.seed)
            print(json.dumps({k: str(v) for k, v in vars(world).items()}, indent=2))
    except USER_ERRORS as err:
        print(f"ammd: error: {one_line(err)}", file=sys.stderr)
        return 2
    except ActorLostError as err:
        print(f"ammd: error: {one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        import ray
        if not isinstance(err, ray.exceptions.RayActorError):
            raise
        # The driver names the actor it lost (ActorLostError); anything Ray raises past it
        # still ends in one line, not a wall of Ray text.
        print(f"ammd: error: a Ray actor died during the job ({first_line(err)}); its log is above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
