"""Numbers the learner's maths and its configuration share, in one torch-free place.

``cluster.config`` validates ``loss.params`` through ``learner.loss_params`` before any actor
starts, and the rollout side floors the teacher's tail the way the losses do, so neither may
need torch or the maths modules to read these.
"""
from __future__ import annotations

# log-mass floor of a top-k tail bucket: exp(-69) ~ 1e-30, so an empty tail (-inf) never
# yields inf or NaN (learner.losses, learner.amm, and the rollout engines' tail_logmass).
TAIL_LOG_FLOOR = -69.0

# Positions a loss processes at a time: one chunk's [chunk, V] float32 intermediates are alive.
DEFAULT_CHUNK_SIZE = 256

# r of AMM's low-rank heads: (hidden + V) r + V parameters each (learner.amm_heads).
DEFAULT_HEAD_RANK = 64
