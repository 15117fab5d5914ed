"""The largest absolute difference of each parity check of a test module, printed at the module's end (run with
``-s`` to see them): the figures the issue notes quote.

Example (in a test module)::

    MAX_DIFFS = MaxDiffs("OPT max abs diff vs transformers / peft (fp32)")
    report_max_diffs = MAX_DIFFS.fixture()
    record = MAX_DIFFS.record
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest


class MaxDiffs(dict):
    """Check name -> the largest difference recorded for it."""

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title

    def record(self, name: str, diff: float) -> float:
        self[name] = max(self.get(name, 0.0), float(diff))
        return float(diff)

    def fixture(self) -> Callable[[], Iterator[None]]:
        """A module-scoped autouse fixture that prints the table after the module's tests."""

        @pytest.fixture(scope="module", autouse=True)
        def report_max_diffs() -> Iterator[None]:
            yield
            print(f"\n\n{self.title}:")
            for name, diff in sorted(self.items()):
                print(f"  {name:<56s} {diff:.3e}")

        return report_max_diffs
