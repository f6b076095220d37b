"""Benchmarks live in bench_*.py files (not test_*.py), so that the default test run never picks them up; this
makes ``pytest benches`` collect them (CI runs every benchmark body once with --benchmark-disable)."""
from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # Files named on the command line are already collected by pytest itself, whatever their name.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
