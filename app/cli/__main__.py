"""`python -m app.cli`: the same as the `stella` command."""

from app.cli.main import main

main()
