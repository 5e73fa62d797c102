"""pytest plugin (entry point ``pytest11``): the ``seqzoo_check`` fixture for plugin authors.

    def test_my_layer(seqzoo_check):
        seqzoo_check("my_layer", num_heads=2)
"""

from __future__ import annotations

import pytest


@pytest.fixture
def seqzoo_check():
    """``check_layer`` from ``seqzoo.testing``: raises ``AssertionError`` with a report on failure."""
    from . import check_layer

    return check_layer
