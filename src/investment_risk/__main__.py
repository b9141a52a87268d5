"""`python -m investment_risk` is the `investment-risk` command (what `jobs run-local` starts for each pod)."""

from .cli.app import run

run()
