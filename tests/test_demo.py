"""`make demo` end to end at a toy budget: every step runs and the table has every row."""

import pytest

from ocd_hf import demo


@pytest.mark.slow  # trains the demo's base model and head and computes every evaluation row
def test_demo_runs_end_to_end(capsys):
    demo.main(["--steps", "3"])
    out = capsys.readouterr().out
    assert "delta_scale" in out and "total" in out
    for row in (
        "| base |",
        "| base + temperature scaling |",
        "| kNN in i_L space |",
        "| oracle, all layers (test label) |",
        "| OCD |",
        "| OCD x5 |",
        "| nearest-neighbour delta |",
        "| mean-delta control |",
    ):
        assert row in out, row
