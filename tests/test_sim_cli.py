"""`slinfer simulate` end to end on a small synthetic trace and a toy profile (no ../shared)."""

from __future__ import annotations

import csv
import json

import pytest
from test_sim import toy_published

from autoscaler.sim import cli
from runtime import cli as runtime_cli


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(toy_published()))
    return path


def test_simulate_sweep_writes_json_csv_png_and_ends_with_a_json_line(tmp_path, profile, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--profile", str(profile), "--model", "toy", "--duration", "10", "--cpus", "1", "--gpus", "1",
                   "--systems", "sllm,slinfer", "--sweep", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["model"] == "toy"
    assert set(last["capacity"]) == {"sllm", "slinfer"}
    assert list(last["slo_met"]["slinfer"]) == [str(16 * g) for g in range(1, 9)]
    assert all(0.0 <= v <= 1.0 for v in last["slo_met"]["sllm"].values())
    assert captured.err.count("[simulate] toy") == 16  # one progress line per run
    for name in ("runs.json", "runs.csv", "slo_attainment.png", "ttft_cdf.png", "nodes_used.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "slo_attainment.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 16 and {r["system"] for r in rows} == {"sllm", "slinfer"}
    for r in rows:  # every miss has one cause
        assert sum(int(r[f"missed_{c}"]) for c in ("dropped", "ttft_load", "ttft", "tpot")) == \
            int(r["requests"]) - int(r["slo_met"])
    doc = json.loads((out / "runs.json").read_text())
    assert doc["summary"] == last and len(doc["runs"]) == 16 and doc["runs"][0]["ttft_cdf"]
    top = doc["runs"][-1]["by_rank"]
    assert top[0]["first"] == 1 and sum(b["requests"] for b in top) == doc["runs"][-1]["requests"]
    assert "met by function rank: 1-8 " in captured.err


def test_slinfer_simulate_dispatches_and_reports_bad_input(tmp_path, profile, capsys):
    with pytest.raises(SystemExit) as e:
        runtime_cli.main(["simulate", "--profile", str(profile), "--model", "toy", "--duration", "10",
                          "--functions", "16", "--systems", "slinfer", "--out", str(tmp_path / "o")])
    assert e.value.code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["slo_met"]["slinfer"].keys() == {"16"}
    assert cli.main(["--profile", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["--profile", str(profile), "--model", "toy", "--systems", "nope"]) == 2
    assert "unknown system" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--profile", str(profile), "--model", "toy", "--loads", "nvme"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli.main(["--profile", str(profile), "--model", "toy", "--busiest", "4", "--sweep"]) == 2
    assert "leave out --sweep and --functions" in capsys.readouterr().err
    assert cli.main(["--profile", str(profile), "--model", "toy", "--busiest", "999"]) == 2
    assert "busiest(999)" in capsys.readouterr().err


def test_simulate_busiest_runs_only_the_busiest_functions(tmp_path, profile, capsys):
    rc = cli.main(["--profile", str(profile), "--model", "toy", "--duration", "10", "--busiest", "3",
                   "--systems", "slinfer", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["slo_met"]["slinfer"].keys() == {"3"}


@pytest.mark.parametrize("loads, from_disk", [("tiered", True), ("host-pool", False), ("instant", False)])
def test_simulate_applies_and_reports_the_load_source(tmp_path, profile, capsys, loads, from_disk):
    out = tmp_path / "o"
    rc = cli.main(["--profile", str(profile), "--model", "toy", "--duration", "10", "--functions", "16",
                   "--systems", "slinfer", "--loads", loads, "--out", str(out)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loads"] == loads
    (run,) = json.loads((out / "runs.json").read_text())["runs"]
    assert run["stats"]["loads"] > 0 and (run["stats"]["loads_from_disk"] > 0) is from_disk
