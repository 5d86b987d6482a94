"""Alembic migrations of the Stella schema (`stella db upgrade`)."""
