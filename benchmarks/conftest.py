"""Benchmarks run in the normal test suite only as smoke runs (tiny sizes, seconds)."""

import pytest


@pytest.fixture
def tiny_lengths():
    return [16, 32]
