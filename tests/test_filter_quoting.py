"""Sweep names with quotes in MLflow filter strings (issue 9, item 15)."""

import pytest

from test_tracking import store  # noqa: F401  (the fixture: a fresh tracking store with one parent run)

from affseg.sweep import promote
from affseg.sweep.tracking import parent_run, quote_filter_value, tag_filter


def test_quote_picks_the_free_quote():
    assert quote_filter_value("plain") == "'plain'"
    assert quote_filter_value("x'") == "\"x'\""
    assert quote_filter_value('y"') == "'y\"'"
    with pytest.raises(ValueError, match="cannot be searched"):
        quote_filter_value("z'\"")
    assert tag_filter({"a": "1", "b": "it's"}) == "tags.`a` = '1' AND tags.`b` = \"it's\""


def test_promote_finds_sweeps_whose_names_hold_quotes(store, tmp_path):
    client, ref = store
    experiment_id = ref.experiment_id
    space = tmp_path / "space.yaml"
    parents = {name: parent_run(client, experiment_id, name, [space], {"space": "space"}) for name in ("x'", 'y"')}
    for name, run_id in parents.items():
        assert promote.sweep_parent(client, experiment_id, name).info.run_id == run_id
    with pytest.raises(promote.PromotionError, match="no sweep"):
        promote.sweep_parent(client, experiment_id, "absent'")
    with pytest.raises(promote.PromotionError, match="cannot be searched") as error:
        promote.sweep_parent(client, experiment_id, "z'\"")
    assert "\n" not in str(error.value)
