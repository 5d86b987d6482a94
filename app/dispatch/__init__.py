"""Dispatch by selector: one operator request, a task per matching agent."""
