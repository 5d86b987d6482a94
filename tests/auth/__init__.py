"""Tests of agent authentication: JWT, client certificate, trusted-proxy header."""
