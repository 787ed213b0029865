"""benchmarks/peak_memory.py end to end on a small, narrow WanPipeline (guidance as two model calls a step),
eager, compiled whole and compiled block by block with dynamo's eager backend: each cache's peak rises
above uncached by at most what it keeps, and it keeps one hidden state per call slot (whole blocks: one chain), two with
forecasting (the last two residuals), or one per layer and slot (attn1 + ffn); the measure sees what
each method holds between generations, cache-dit's too."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
peak_memory = importlib.import_module("peak_memory")


def test_each_cache_peaks_at_most_what_it_keeps_above_uncached(tmp_path):
    path = peak_memory.main(["--size", "tiny", "--backend", "eager", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    assert path.name == "peak-memory-wan-cpu.json" and path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    rows = {(r["mode"], r["method"]): r for r in result["rows"]}
    methods = ("uncached", "blocks", "layers", "blocks-forecast", "cache-dit")
    assert list(rows) == [(mode, method) for mode in peak_memory.MODES for method in methods]
    assert result["versions"]["cache-dit"] == "1.5.3" and result["complete"]
    layers = peak_memory.WAN_NARROW["num_layers"]
    for mode in peak_memory.MODES:
        assert rows[mode, "uncached"]["peak_bytes"] > 0 and rows[mode, "uncached"]["kept_bytes"] == 0
        assert rows[mode, "blocks"]["kept_in_hidden_states"] == 2  # one residual per call slot
        assert rows[mode, "layers"]["kept_in_hidden_states"] == 2 * 2 * layers  # attn1 and ffn, per block and slot
        assert rows[mode, "blocks-forecast"]["kept_in_hidden_states"] == 2 * 2
        for method in methods[1:4]:
            row = rows[mode, method]
            assert row["held_over_uncached_bytes"] == row["kept_bytes"]  # measured as the handle reports it
            assert 0 <= row["rise_over_uncached_bytes"] <= row["kept_bytes"]
        # cache-dit F1B0 holds, per call slot, its first block's residual and the other blocks' (and a little more)
        dit = rows[mode, "cache-dit"]
        assert dit["kept_bytes"] is None and 4 <= dit["held_in_hidden_states"] < 5
        assert dit["rise_over_uncached_bytes"] >= dit["held_over_uncached_bytes"] > rows[mode, "blocks"]["kept_bytes"]


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    real_measure, measured = peak_memory.measure, []

    def measure_two(*args, **kwargs):
        if len(measured) == 2:
            raise KeyboardInterrupt  # the lease ran out
        measured.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(peak_memory, "measure", measure_two)
    with pytest.raises(KeyboardInterrupt):
        peak_memory.main(["--size", "tiny", "--backend", "eager", "--modes", "eager", "--methods", "blocks", "layers",
                          "--out", str(tmp_path)])
    result = json.loads((tmp_path / "peak-memory-wan-cpu.json").read_text())
    assert not result["complete"] and [r["method"] for r in result["rows"]] == ["uncached", "blocks"]
    assert result["rows"][1]["held_over_uncached_bytes"] == result["rows"][1]["kept_bytes"] > 0
    assert (tmp_path / "peak-memory-wan-cpu.png").exists()



def test_the_plot_draws_every_rows_peak_per_mode_and_leaves_unmeasured_cells_out(tmp_path, monkeypatch):
    """The second panel shows each row's own peak beside its mode's uncached one (modes differ in the
    model's activations as much as caches in what they keep); a run cut short lacks bars, not panels."""
    import smoothcache.plots

    hidden = 1000
    rows = [{"mode": mode, "method": method, "peak_bytes": peak, "held_bytes": held, "kept_bytes": held}
            for mode, method, peak, held in [("compile", "uncached", 13000, 0), ("compile", "blocks", 15000, 2000),
                                             ("regional", "uncached", 9000, 0)]]
    uncached = {r["mode"]: r for r in rows if r["method"] == "uncached"}
    result = {"device": "test", "settings": {"size": "wan-b8", "hidden_state_bytes": hidden},
              "rows": [peak_memory.above_uncached(r, uncached[r["mode"]], hidden) for r in rows]}
    figures = []
    monkeypatch.setattr(smoothcache.plots, "save_figure", lambda fig, path: figures.append(fig))
    peak_memory.plot(result, tmp_path / "plot.png")
    rise_and_held, peaks = figures[0].axes
    assert [round(b.get_height(), 3) for b in rise_and_held.patches] == [2.0, 2.0]  # blocks: rise, held
    assert sorted(round(b.get_height(), 3) for b in peaks.patches) == [9.0, 13.0, 15.0]
    assert [t.get_text() for t in peaks.get_xticklabels()] == ["compile", "regional"]

def test_uncached_is_always_measured_and_a_missing_peer_is_named(tmp_path, monkeypatch, capsys):
    args = peak_memory.parse_args(["--out", str(tmp_path), "--methods", "cache-dit", "blocks"])
    assert args.methods == ["uncached", "blocks", "cache-dit"]
    monkeypatch.setattr(peak_memory.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        peak_memory.parse_args(["--out", str(tmp_path), "--methods", "cache-dit"])
    assert "pip install cache-dit==1.5.3, or leave it out of --methods" in capsys.readouterr().err


def memory_event(ts: float, size: int, address: int, device_type: int = 0) -> dict:
    return {"name": "[memory]", "ts": ts, "args": {"Bytes": size, "Addr": address, "Device Type": device_type}}


def test_the_cpu_count_counts_what_was_allocated_since_the_profile_began_and_is_still_live():
    """Frees of memory allocated before (an earlier profile saw it: the profiler still reports them)
    count nothing; a reused address counts anew; another device's events are not the CPU's."""
    events = [
        memory_event(0, -500, 1),  # allocated before this profile, freed in it
        memory_event(1, 100, 2),   # live as the window begins
        memory_event(2, 40, 3),
        memory_event(3, -40, 3),
        memory_event(4, 10_000, 9, device_type=1),  # a GPU's
        memory_event(5, 60, 3),    # the address again, inside the window
        memory_event(6, 30, 4),    # the window's peak: 100 + 60 + 30
        memory_event(7, -60, 3),
        memory_event(8, 999, 5),   # after the window
    ]
    assert peak_memory.allocated_since_start(events, start=5, end=7) == (190, 100)
    assert peak_memory.allocated_since_start(events, start=20, end=30) == (1129, 1129)  # nothing from the start on
