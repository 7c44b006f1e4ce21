import subprocess

import pytest

from tests.slurm.cluster import SUBMITTED


@pytest.fixture(scope="module", autouse=True)
def _cancel_leftovers():
    yield
    while SUBMITTED:  # only the jobs this module submitted
        subprocess.run(["scancel", SUBMITTED.pop()], capture_output=True, timeout=30)
