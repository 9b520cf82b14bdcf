"""Reading a job's TensorBoard event files back with TensorBoard's own reader, for the tests."""
from __future__ import annotations

from pathlib import Path


def read_events(log_dir: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """Every scalar in ``log_dir`` as {tag: {step: (wall time, value)}}, read by TensorBoard's
    EventAccumulator. ammd writes float64 tensors (``new_style``), so they are under
    ``Tensors``; all are kept (size 0), not the accumulator's default sample of 10 per tag.
    Fails when a tag holds a step twice (a reader would draw both)."""
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(log_dir), size_guidance={TENSORS: 0})
    acc.Reload()
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: (e.wall_time, float(make_ndarray(e.tensor_proto))) for e in events}
    return out


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """``read_events`` without the wall times: {tag: {step: value}}."""
    return {tag: {step: value for step, (_, value) in by_step.items()}
            for tag, by_step in read_events(log_dir).items()}
