"""One head trains exactly as the code before the teacher/students restructure did (issue 10)."""

from __future__ import annotations

import json
import math

from one_head_reference import REFERENCE_FILE, record_run

TOLERANCE = 1e-4  # issue 10: same losses and metrics for the same seed


def test_one_head_reproduces_the_reference_run(small_demo, tmp_path):
    expected = json.loads(REFERENCE_FILE.read_text())
    actual = record_run(small_demo, tmp_path / "run")
    assert actual["logs"].keys() == expected["logs"].keys()
    for iteration, values in expected["logs"].items():
        for key, value in values.items():
            assert math.isclose(actual["logs"][iteration][key], value, abs_tol=TOLERANCE), (iteration, key)
    assert [v["iteration"] for v in actual["validations"]] == [v["iteration"] for v in expected["validations"]]
    for got, want in zip(actual["validations"], expected["validations"]):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert math.isclose(got[key], value, abs_tol=TOLERANCE), (want["iteration"], key)
