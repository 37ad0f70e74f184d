"""Sweep names with quotes in MLflow filter strings (issue 9, item 15)."""

import pytest

from affseg.config import TrackingConfig
from affseg.sweep import promote
from affseg.sweep.tracking import open_experiment, parent_run, quote_filter_value, tag_filter


def test_quote_picks_the_free_quote():
    assert quote_filter_value("plain") == "'plain'"
    assert quote_filter_value("x'") == "\"x'\""
    assert quote_filter_value('y"') == "'y\"'"
    with pytest.raises(ValueError, match="cannot be searched"):
        quote_filter_value("z'\"")
    assert tag_filter({"a": "1", "b": "it's"}) == "tags.`a` = '1' AND tags.`b` = \"it's\""


def test_promote_finds_sweeps_whose_names_hold_quotes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    client, experiment_id = open_experiment(cfg)
    space = tmp_path / "space.yaml"
    space.write_text("parameters: {}\n")
    parents = {name: parent_run(client, experiment_id, name, [space], {"space": "space"}) for name in ("x'", 'y"')}
    for name, run_id in parents.items():
        assert promote._parent(client, experiment_id, name).info.run_id == run_id
    with pytest.raises(promote.PromotionError, match="no sweep"):
        promote._parent(client, experiment_id, "absent'")
    with pytest.raises(promote.PromotionError, match="cannot be searched") as error:
        promote._parent(client, experiment_id, "z'\"")
    assert "\n" not in str(error.value)
