"""Learner side: losses, AMM adversary, DeepSpeed learner actors, weight export and sync."""
