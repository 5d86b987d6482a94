"""Celery workers: thin jobs that call the services in `app/`."""
