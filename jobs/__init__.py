"""Ray job entrypoints: `ray job submit --working-dir . -- python -m jobs.train jobs/specs/genomic.yaml`."""
