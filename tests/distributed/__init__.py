"""Tests against a real local Ray cluster and a real PostgreSQL server.

A package, so that this folder's conftest.py is imported as ``distributed.conftest`` and does not replace the
top-level ``conftest`` module that other tests import helpers from.
"""
