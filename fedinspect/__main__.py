"""``python -m fedinspect`` runs the command line."""

from fedinspect.cli import app

app()
