"""Serving the app: uvicorn configuration and its TLS (mTLS) glue."""
