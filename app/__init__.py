"""Stella agent dispatch: the web service and the services behind it."""
