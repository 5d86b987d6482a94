"""Celery beat: the schedule of the periodic sweeps."""
