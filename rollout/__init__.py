"""Everything that generates or scores tokens: engines and rollout actors."""
