import subprocess

import pytest

from tests.conftest import in_ci
from tests.slurm.cluster import SUBMITTED, cluster_problem


@pytest.fixture(scope="module", autouse=True)
def _cluster_up_under_ci(request):
    """Under CI a module of slurm tests fails (instead of skipping) when the local cluster is not usable.
    Autouse, so it runs before the module's own fixtures submit anything."""
    if in_ci() and request.node.get_closest_marker("slurm") is not None:
        problem = cluster_problem()
        if problem:
            pytest.fail(f"CI is set but the Slurm tests cannot run: {problem}", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _cancel_leftovers():
    yield
    while SUBMITTED:  # only the jobs this module submitted
        subprocess.run(["scancel", SUBMITTED.pop()], capture_output=True, timeout=30)
