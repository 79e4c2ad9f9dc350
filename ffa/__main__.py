"""`python -m ffa`: print the environment report (see ffa/info.py) for bug reports."""

from .info import info

info()
