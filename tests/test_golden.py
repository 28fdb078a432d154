"""Golden figures: the suite's digits replica scanned in both modes must give the figures
recorded before the scanners' bookkeeping moved to deepdot.scan.schedule (commit b135195).

The replica is conftest's ``badnets_digits`` (trained deterministically from seed 0); the figures
were recorded by running the same training and scans on that commit. A change that moves any
label's mask L1, the median, the MAD or the anomaly index by more than 1e-5 fails here: if the
change is meant to alter the scan, record the figures anew and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepdot.scan import FastNeuralCleanse, NeuralCleanse

GOLDEN = json.loads((Path(__file__).parent / "golden" / "digits_scan.json").read_text())
SCANNERS = {"fast": FastNeuralCleanse(), "faithful": NeuralCleanse(steps=40, samples_per_step=128)}


@pytest.mark.parametrize("mode", list(SCANNERS))
def test_scan_figures_match_the_golden_record(badnets_digits, digits_test, mode):
    expected = GOLDEN[mode]
    result = SCANNERS[mode].scan(badnets_digits[0], digits_test).to_dict()
    assert result["flagged"] == expected["flagged"] == [7]
    assert result["image_passes"] == expected["image_passes"]
    for key in ("median", "mad", "anomaly_index"):
        assert result[key] == pytest.approx(expected[key], abs=1e-5), key
    for item in result["labels"]:
        want = expected["labels"][str(item["label"])]
        assert item["steps"] == want["steps"], item["label"]
        assert item["mask_l1"] == pytest.approx(want["mask_l1"], abs=1e-5), item["label"]
        assert item["anomaly_index"] == pytest.approx(want["anomaly_index"], abs=1e-5), item["label"]
