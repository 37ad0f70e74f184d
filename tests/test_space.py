"""Sweep spaces as data: the shipped files load, bad files fail with one line naming file, key and
what is allowed, conditional parameters are sampled only when active."""

from __future__ import annotations

import optuna
import pytest

from affseg.config import ConfigError
from affseg.sweep.space import PARAM_KINDS, PRUNER_TYPES, SWEEPS_DIR, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

REFINE_KEYS = {"refine.alpha", "refine.box_threshold", "refine.background", "refine.bg_power", "refine.bg_score",
               "refine.deviation", "refine.n0"}
LOSS_KEYS = {"loss.lam", "loss.seg", "loss.aff"}
LR_KEYS = {"optim.lr", "optim.warmup_iters"}


def _space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _error(tmp_path, text: str, profile: str = "demo") -> str:
    path = _space(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path, profile)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize("name, keys", [("refine", REFINE_KEYS), ("loss", LOSS_KEYS), ("lr", LR_KEYS),
                                        ("full", REFINE_KEYS | LOSS_KEYS | LR_KEYS)])
def test_shipped_spaces_load(name, keys):
    spec = load_space(name, "demo")
    assert {p.key for p in spec.parameters} == keys
    assert (spec.metric, spec.mode, spec.profile) == ("val/miou", "max", "demo")
    assert spec.trials >= 8
    config = spec.trial_config({})
    assert config.model.encoder == "unicl_swin_tiny"
    assert config.data.demo is True
    assert config.train.iterations // config.train.val_interval == 8  # ~8 validations per demo trial


def test_full_is_union_with_conditions_and_its_own_pruner():
    full = load_space("full", "demo")
    refine = load_space("refine", "demo")
    by_key = {p.key: p for p in full.parameters}
    assert by_key["refine.bg_power"].when.key == "refine.background"
    assert by_key["refine.bg_power"].when.values == ("power",)
    assert by_key["refine.bg_score"].when.values == ("constant",)
    assert full.pruner.type == "successive_halving" and full.pruner.signal == ""  # val mIoU
    assert refine.pruner.type == "successive_halving" and refine.pruner.signal == "pseudo/refined"  # measured
    # conditional parameters come after the parameter they depend on
    keys = [p.key for p in full.parameters]
    assert keys.index("refine.background") < keys.index("refine.bg_power")


def test_profile_narrows_schedule_dependent_ranges(monkeypatch):
    demo = {p.key: p for p in load_space("lr", "demo").parameters}
    assert (demo["optim.warmup_iters"].low, demo["optim.warmup_iters"].high) == (0, 24)
    monkeypatch.setenv("VOC_ROOT", "/data/VOCdevkit/VOC2012")
    monkeypatch.setenv("UNICL", "/weights/unicl.pth")
    voc = load_space("lr", "voc")
    assert {p.key: p for p in voc.parameters}["optim.warmup_iters"].high == 1500
    config = voc.trial_config({})
    assert config.data.root == "/data/VOCdevkit/VOC2012"
    assert (config.model.encoder, config.model.checkpoint) == ("unicl_swin_b", "/weights/unicl.pth")
    assert config.train.iterations == 30_000


def test_voc_profile_without_environment_is_one_line(monkeypatch):
    monkeypatch.delenv("VOC_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"voc\.yaml: .*VOC_ROOT"):
        load_space("refine", "voc")


def test_overrides_reach_settings_and_config():
    spec = load_space("refine", "demo", ["trials=3", "pruner.n_startup_trials=1", "train.iterations=48"])
    assert spec.trials == 3 and spec.pruner.n_startup_trials == 1 and spec.pruner.type == "successive_halving"
    assert spec.trial_config({}).train.iterations == 48
    with pytest.raises(ConfigError, match="unknown key 'bogus'; allowed: metric"):
        load_space("refine", "demo", ["bogus=1"])


@pytest.mark.parametrize("text, expected", [
    ("parameters:\n  refine.alphaa: {type: int, low: 1, high: 3}\n",
     "parameters.refine.alphaa: unknown config key; allowed under refine: alpha, n0"),
    ("parameters:\n  refinee.alpha: {type: int, low: 1, high: 3}\n",
     "parameters.refinee.alpha: unknown config key; allowed sections: data, model, refine"),
    ("parameters:\n  refine.par: {type: int, low: 1, high: 3}\n",
     "parameters.refine.par: refine.par is a section; sweep one of its keys: enabled"),
    ("parameters:\n  refine.alpha: {type: gauss, low: 1, high: 3}\n",
     f"parameters.refine.alpha.type: 'gauss' is not allowed; choose one of {', '.join(PARAM_KINDS)}"),
    ("parameters:\n  refine.box_threshold: {type: uniform, low: 0.6, high: 0.3}\n",
     "parameters.refine.box_threshold: low (0.6) must be below high (0.3)"),
    ("parameters:\n  optim.lr: {type: loguniform, low: 0, high: 0.1}\n",
     "parameters.optim.lr.low: loguniform needs low > 0, got 0"),
    ("parameters:\n  refine.background: {type: categorical, choices: []}\n",
     "parameters.refine.background.choices: must be a non-empty list of values allowed for refine.background ('power', 'constant')"),
    ("parameters:\n  refine.background: {type: categorical, choices: [power, fog]}\n",
     "parameters.refine.background: 'fog' is not allowed; choose one of 'power', 'constant'"),
    ("parameters:\n  refine.alpha: {type: uniform, low: 1, high: 3}\n",
     "parameters.refine.alpha.type: refine.alpha is an integer; use type: int"),
    ("parameters:\n  refine.alpha: {type: int, low: 1, high: 3, spread: 2}\n",
     "parameters.refine.alpha: unknown key 'spread'; allowed: type, low, high, step, choices"),
    ("parameters:\n  refine.alpha: {type: int, low: 1, high: 3}\npruner: {type: asha}\n",
     f"pruner.type: 'asha' is not allowed; choose one of {', '.join(PRUNER_TYPES)}"),
    ("parameters:\n  refine.alpha: {type: int, low: 1, high: 3}\npruner: {signal: loss}\n",
     "pruner.signal: 'loss' is not reported by trials; choose one of val/miou"),
    ("parameters:\n  refine.alpha: {type: int, low: 1, high: 3}\nmode: maximise\n",
     "mode: 'maximise' is not allowed; choose one of max, min"),
    ("parameters:\n  refine.alpha: {type: int, low: 1, high: 3}\nmetric: val/loss\n",
     "metric: 'val/loss' is not reported by trials; choose one of val/miou"),
    ("parameters:\n  refine.alpha: {type: int, low: 1, high: 3}\ntrails: 4\n",
     "unknown key 'trails'; allowed: include, parameters"),
    ("parameters:\n  refine.alpha: {type: int, low: 1, high: 3}\nbase: {refine: {alpha: 0}}\n",
     "base: refine.alpha: 0 must be an integer >= 1"),
    ("parameters:\n  refine.bg_power: {type: uniform, low: 1, high: 2}\n"
     "conditions:\n  refine.bg_power: {refine.background: power}\n",
     "conditions.refine.bg_power: 'refine.background' must be an unconditional categorical parameter of the space; this space has none"),
    ("parameters:\n  refine.background: {type: categorical, choices: [power]}\n"
     "  refine.bg_power: {type: uniform, low: 1, high: 2}\n"
     "conditions:\n  refine.bg_power: {refine.background: constant}\n",
     "conditions.refine.bg_power.refine.background: 'constant' is not among its choices ['power']"),
    ("parameters: {}\n", "parameters: the space sweeps nothing"),
])
def test_bad_space_is_one_line_naming_file_key_and_allowed(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


def test_space_file_is_data_not_code(tmp_path):
    message = _error(tmp_path, "parameters: !!python/object/apply:os.system ['echo hacked']\n")
    assert "is not valid YAML" in message


def test_unknown_space_and_profile_list_choices(tmp_path):
    with pytest.raises(ConfigError, match="no such sweep space; choose one of full, loss, lr, refine"):
        load_space("refinement", "demo")
    with pytest.raises(ConfigError, match="no such profile; choose one of demo, voc"):
        load_space("refine", "laptop")


def test_include_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b]\n")
    (tmp_path / "b.yaml").write_text("include: [a]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_space(tmp_path / "a.yaml", "demo")


def test_conditional_parameters_sampled_only_when_active():
    spec = load_space("refine", "demo")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(24):
        trial = study.ask()
        params = spec.sample(trial)
        background = params["refine.background"]
        seen.add(background)
        assert ("refine.bg_power" in params) == (background == "power")
        assert ("refine.bg_score" in params) == (background == "constant")
        assert set(trial.params) == set(params)  # Optuna saw exactly the active parameters
        assert 1 <= params["refine.alpha"] <= 4 and 0.2 <= params["refine.box_threshold"] <= 0.7
        config = spec.trial_config(params)
        assert config.refine.background == background and config.refine.alpha == params["refine.alpha"]
        study.tell(trial, 0.0)
    assert seen == {"power", "constant"}


def test_sweeps_folder_holds_the_five_spaces_and_two_profiles():
    assert sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")) == ["full", "loss", "lr", "refine", "stages"]
    assert sorted(p.stem for p in (SWEEPS_DIR / "profiles").glob("*.yaml")) == ["demo", "voc"]
