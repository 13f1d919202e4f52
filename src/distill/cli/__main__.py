"""`python -m distill.cli`: the `distill` command."""

from distill.cli import main

main()
