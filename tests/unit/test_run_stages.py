"""kto_lightning.runs.run_stages: a signal before training names the phase it landed in."""

from __future__ import annotations

import sys
from types import FrameType

import pytest

from kto_lightning.runs.run_stages import _phase


def _frame_in(module: str) -> FrameType:
    """A frame whose code runs in `module`, called from this test (outside the project)."""
    namespace: dict = {"__name__": module, "sys": sys}
    exec("def here():\n    return sys._getframe()\n", namespace)
    return namespace["here"]()


@pytest.mark.parametrize(
    ("module", "phase"),
    [
        ("kto_lightning.models.reference_cache", "the reference cache's fill"),
        ("kto_lightning.models.cache_key", "the reference cache's fill"),
        ("kto_lightning.models.loading", "model loading"),
        ("kto_lightning.data.tokenize", "data preparation"),
        ("tests.elsewhere", "the start of the run"),
    ],
)
def test_the_innermost_module_of_the_project_names_the_phase(module: str, phase: str) -> None:
    assert _phase(_frame_in(module)) == phase
