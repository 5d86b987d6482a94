"""Agents: registration, the fleet listing, updates, deletion and heartbeats."""
