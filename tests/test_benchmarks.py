"""Smoke runs of the benchmarks' --quick modes on the bundled mini model (the full runs are documented in
benchmarks/RESULTS.md)."""

import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore")


def test_erase_quick(tmp_path):
    import erase

    erase.main(["--quick", "--out", str(tmp_path / "erase")])
    data = json.loads((tmp_path / "erase.json").read_text())
    assert list(data["summary"]) == list(erase.METHODS)
    assert set(data["results"]["none"]) == {"target", "complex", "benign", "adversarial"}
    none = data["summary"]["none"]
    assert none["benign_bit_identical"] == 1.0
    if data["results"]["none"]["target"]["target_detections"]:
        assert none["erase_rate_target"] == 0.0
    for name in ("erase_tradeoff.png", "erase_grid.png", "erase.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_erase_quick_selected_methods(tmp_path):
    import erase

    erase.main(["--quick", "--methods", "SEGA", "DAG + SEGA", "--out", str(tmp_path / "erase")])
    data = json.loads((tmp_path / "erase.json").read_text())
    assert list(data["summary"]) == ["none", "SEGA", "DAG + SEGA"]  # the reference always runs


def test_detection_quick(tmp_path):
    import detection

    detection.main(["--quick", "--out", str(tmp_path / "detection")])
    data = json.loads((tmp_path / "detection.json").read_text())
    assert set(data["summary"]) == {"optimized", "init", "optimized (filled only)"}
    for row in data["summary"].values():
        assert 0.0 <= row["iou_target"] <= 1.0 and 0.0 <= row["false_detection_rate"] <= 1.0


def test_i2p_with_the_shapes_detector(tmp_path):
    import i2p

    prompts = tmp_path / "prompts.csv"
    with prompts.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "evaluation_seed", "categories"])
        writer.writerow(["a red star and a blue circle on a white background", 3, "target"])
        writer.writerow(["a red star on a gray background", 7, "target"])
    i2p.main(
        [
            "--csv",
            str(prompts),
            "--detector",
            "shapes",
            "--methods",
            "none",
            "DAG + SEGA",
            "--images-per-prompt",
            "2",
            "--steps",
            "8",
            "--out",
            str(tmp_path / "i2p"),
        ]
    )
    table = json.loads((tmp_path / "i2p" / "erase_rate.json").read_text())
    assert set(table) == {"none", "DAG + SEGA"}
    assert table["none"]["detections"] == 0 or table["none"]["erase_rate"] == 0.0
