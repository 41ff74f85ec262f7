"""Smoke run of the chaos benchmark (``python -m bench.chaos --quick``): it runs, and the
harness's invariants hold in harnessed mode. The figures themselves are reported, not asserted."""

from __future__ import annotations

import pytest

from bench import chaos


@pytest.mark.slow
def test_quick_chaos_run_keeps_the_harness_invariants() -> None:
    table = chaos.main(["--quick"])
    harnessed = {p: s for (p, mode), s in table.items() if mode == "harnessed"}
    assert set(harnessed) == {"silent 30%", "crash 30%", "mixed 10/10"}
    for profile, s in harnessed.items():
        assert s["overspend_tasks"] == 0, profile
        assert s["duplicates"] == 0, profile
        assert s["reexecuted"] == 0, profile
    # The workload really is hostile: crashes fired, and bare restarts duplicated effects.
    assert table[("crash 30%", "harnessed")]["crashes"] > 0
    assert table[("crash 30%", "bare-restart")]["duplicates"] > 0
