"""The Celery app of `stella worker`, `stella beat` and `stella flower`.

Configured from the same settings as the web process (app/jobs.py), with
the beat schedule (beat/schedule.py) and the job modules registered.
"""

from __future__ import annotations

from celery import Celery

from app.jobs import make_celery, prepare_embedded_broker
from app.settings import get_settings
from beat.schedule import beat_schedule


def create_celery() -> Celery:
    settings = get_settings()
    prepare_embedded_broker(settings, consumer=True)
    celery = make_celery(settings)
    celery.conf.beat_schedule = beat_schedule(settings)
    celery.conf.include = ["workers.fanout", "workers.sweeps"]
    return celery


celery_app = create_celery()
