"""Shared fixtures."""

import pytest


@pytest.fixture(scope="module")
def one_blas_thread():
    """Tiny matrices: BLAS threads only add overhead (ten times slower on a 2-core machine).

    Modules that run many small generated modules use it (``pytestmark``)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
