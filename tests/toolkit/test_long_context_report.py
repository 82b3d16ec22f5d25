"""fmt_hf.toolkit.long_context_report: the table's cells (mean, Wilson interval, dagger past the training length,
medians of the costs) and one heat map per system with a depth."""

import pytest

from fmt_hf.toolkit.long_context import wilson_interval
from fmt_hf.toolkit.long_context_report import plot_heat_maps, results_table


def row(system, score, length=2048, depth=0.5, training_length=8192, decode=4.0):
    return dict(
        task="passkey",
        length=length,
        system=system,
        score=score,
        depth=depth,
        training_length=training_length,
        cache_vectors=1224,
        prefill_seconds=1.5,
        decode_ms_per_token=decode,
        cache_mib=26.9,
    )


def test_table_cells():
    rows = [row("fmt", 1.0), row("fmt", 0.0), row("fmt", 1.0), row("dense", 1.0, length=16384, decode=None)]
    table = results_table(rows)
    low, high = wilson_interval(2.0, 3)
    assert f"| passkey | 2048 | fmt | 3 | 0.67 ({low:.2f}-{high:.2f}) | 1224 | 1.5 | 4 | 26.9 |" in table
    assert "| passkey | 16384 † | dense | 1 | 1.00 " in table and "| - | 26.9 |" in table


def test_heat_maps_one_per_system_with_depths(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [row("fmt", 1.0), row("fmt", 0.0, depth=1.0, length=4096), row("dense", 1.0, depth=None)]
    assert plot_heat_maps(rows, str(tmp_path)) == [str(tmp_path / "heatmap_fmt.png")]
    assert (tmp_path / "heatmap_fmt.png").stat().st_size > 0
