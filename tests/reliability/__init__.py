"""Reliability suite (issue 7): faults a long run meets -- kills, non-finite values, resumes with
changes, bad recipes and data, logging failures -- each with the outcome asserted.

A package (this file) so that ``reliability/conftest.py`` does not shadow ``tests/conftest.py``,
which the tests import as ``conftest``."""
