"""Tests of the API surface as a whole: errors, health, documentation, the CA certificate."""
