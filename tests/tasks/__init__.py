"""Tests of the task API: dispatch to one agent, poll, complete, cancel, operator views."""
