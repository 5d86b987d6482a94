"""The audit trail: who registered, changed, deleted or was refused, and when."""
