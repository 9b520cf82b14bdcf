"""The job: config schema, driver loop, actor placement, CLI."""
