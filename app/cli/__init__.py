"""The `stella` command, one module per command group."""
