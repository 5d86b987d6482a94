"""Signed tasks (the server signs what it hands to agents) and signed receipts
(agents sign how they ended a task). The reference agent holds its own copy of
the encodings (`agent/signatures.py`): it imports nothing from the server."""
