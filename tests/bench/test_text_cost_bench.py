"""`nmt-bench text-cost`: a short real run on a tiny bundle (one nmt-serve subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nmt.bench import cli
from nmt.bench.adversarial_text import SHAPES


@pytest.mark.slow
def test_text_cost_runs_on_and_off_and_writes_its_report(tiny_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [
        "text-cost",
        "--bundle",
        str(tiny_bundle),
        "--data-dir",
        str(data_dir),
        "--clients",
        "1,2",
        "--beam",
        "1",
        "--rounds",
        "2",
        "--warmup",
        "0.2",
        "--duration",
        "0.8",
        "--paragraph",
        "6",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--health-clients",
        "2",
        "--health-seconds",
        "0.5",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["text_cost.json", "text_cost.md"]
    result = json.loads((out / "text_cost.json").read_text())
    assert [lv["clients"] for lv in result["levels"]] == [1, 2]
    for level in result["levels"]:
        for side in ("on", "off"):
            assert level[side]["calls"] > 0 and level[side]["errors"] == 0, level
    assert result["paragraph"]["sentences"] == 6 and len(result["paragraph"]["runs_one"]) == 2
    hostile = result["adversarial"]
    assert [row["shape"] for row in hostile["shapes"]] == list(SHAPES) and hostile["sizes"] == [1024, 4096, 16384]
    assert all(len(row["ms"]) == 3 and row["growth"] > 0 for row in hostile["shapes"])
    assert [(h["text_pipeline"], h["clients_send"]) for h in result["health"]] == [
        (pipeline, kind) for pipeline in ("process", "thread") for kind in ("test sentences", "hostile texts")
    ]
    assert all(h["checks"] > 0 and sum(h["codes"].values()) > 0 for h in result["health"])
    assert all(set(h["codes"]) <= {"OK", "INVALID_ARGUMENT"} for h in result["health"][1::2]), result["health"]
    assert "## Hostile texts" in (out / "text_cost.md").read_text()
    with pytest.raises(SystemExit, match="exists"):
        cli.main(argv)  # results are not overwritten without --force
