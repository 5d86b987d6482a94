"""The periodic sweeps beat schedules and workers run."""
