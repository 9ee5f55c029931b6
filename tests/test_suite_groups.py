"""The README's test command runs pytest on two xdist workers with `--dist loadgroup`, and tests/conftest.py puts
each test file in a group of its own (every test of the session's simulated run in one): one worker then builds a
file's module fixtures (a deployment, a simulation) once. pytest-xdist learns a test's group from a suffix it adds
to the test's id while the workers collect. When that fails, nothing else does: the suite passes, the groups are
ignored, and a module fixture is built again on the other worker (with pytest 9.2 and pytest-xdist 3.8, pytest-xdist
issue 1386, or when the conftest's hook runs after xdist's, both of which happened here)."""

from __future__ import annotations

import pytest


def test_under_loadgroup_a_test_carries_its_files_group(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only under pytest-xdist's --dist loadgroup (make test)")
    name = "tests/test_suite_groups.py"
    assert request.node.nodeid == f"{name}::test_under_loadgroup_a_test_carries_its_files_group@{name}"
