import pytest

from affseg.config import Config, ConfigError, load_config, save_config, to_dict, from_dict


def test_defaults_are_spec_numbers():
    config = Config()
    assert config.refine.alpha == 2 and config.refine.n0 == 6 and config.refine.box_threshold == 0.4
    assert config.refine.par.dilations == [1, 2, 4, 8, 12, 24] and config.refine.par.iterations == 20
    assert config.loss.lam == 0.1 and config.optim.lr == 5e-5 and config.optim.warmup_iters == 500
    assert config.train.batch_size == 4 and config.train.accumulation == 2 and config.train.iterations == 30_000
    assert config.refine.refine_start == pytest.approx(1 / 3)
    assert config.refine.sinkhorn_iters == 3 and config.loss.aff_radius == 8 and config.optim.poly_power == 1.0
    assert config.model.decoder_stages == [3] and config.model.affinity_stages == [3]  # SPEC §5.3


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    config = load_config(None, ["refine.alpha=3", "optim.lr=1e-4", "refine.par.scale=0.5", "model.decoder_blocks=[1, 2]"])
    assert config.refine.alpha == 3 and config.optim.lr == 1e-4 and config.refine.par.scale == 0.5
    assert config.model.decoder_blocks == [1, 2]
    save_config(config, path)
    again = load_config(path)
    assert to_dict(again) == to_dict(config)
    # an override on top of a file wins
    assert load_config(path, ["refine.alpha=4"]).refine.alpha == 4
    # int given where float expected is accepted and converted
    assert isinstance(from_dict({"loss": {"lam": 1}}).loss.lam, float)
    # YAML reads `off` as False: a choice named "off" still takes it; a boolean key stays boolean
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(None, ["data.demo=off"]).data.demo is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("refine.alpah=3", "unknown key refine.alpah; allowed: alpha"),
        ("refine.alpha=two", "refine.alpha: expected an integer, got 'two'"),
        ("refine.deviation=median", "refine.deviation: 'median' is not allowed; choose one of 'abs', 'signed'"),
        ("refine.alpha=0", "refine.alpha: 0 must be an integer >= 1"),
        ("refine.box_threshold=1.5", "refine.box_threshold: 1.5 must lie in (0, 1)"),
        ("train.amp=maybe", "train.amp: 'maybe' is not allowed; choose one of 'auto', 'bf16', 'fp16', 'off'"),
        ("nosection.x=1", "unknown key nosection; allowed: data, model"),
        ("refine.par.dilations=[0]", "refine.par.dilations"),
        ("model.decoder_blocks=3", "model.decoder_blocks: expected a list of int, got 3"),
        ("refine.n0=0", "refine.n0: 0 must be >= 1"),
        ("refine.warmup_blocks=0", "refine.warmup_blocks: 0 must be >= 1"),
        ("refine.sinkhorn_iters=0", "refine.sinkhorn_iters: 0 must be >= 1"),
        ("refine.bg_power=0", "refine.bg_power: 0.0 must be > 0"),
        ("refine.par.iterations=0", "refine.par.iterations: 0 must be >= 1 (turn PAR off with enabled=false)"),
        ("data.crop_size=100", "data.crop_size: 100 must be a positive multiple of 16"),
        ("data.crop_size=0", "data.crop_size: 0 must be a positive multiple of 16"),
        ("model.decoder_stages=[]", "model.decoder_stages: [] must list at least one Swin stage (1-4)"),
        ("model.decoder_stages=[0, 3]", "model.decoder_stages: 0 is not a Swin stage; use 1-4"),
        ("model.affinity_stages=[3, 5]", "model.affinity_stages: 5 is not a Swin stage; use 1-4"),
        ("model.affinity_stages=[3, 2, 3]", "model.affinity_stages: [3, 2, 3] lists a stage twice"),
        ("model.decoder_stages=3", "model.decoder_stages: expected a list of int, got 3"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("refine: {alpha: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("refine:\n  alpha: 1.5\n")
    with pytest.raises(ConfigError, match="wrong.yaml: refine.alpha: expected an integer, got 1.5"):
        load_config(wrong)


def test_stages_take_any_distinct_swin_stages():
    config = load_config(None, ["model.decoder_stages=[2, 3, 4]", "model.affinity_stages=[1, 4]"])
    assert config.model.decoder_stages == [2, 3, 4] and config.model.affinity_stages == [1, 4]


def test_the_package_keeps_every_name_and_the_packaged_configs():
    """affseg.config is a package (schema / checks / coercion / loading); its public names and configs stay."""
    import affseg.config as config
    from affseg.cli import field_comments

    for name in ("Config", "ConfigError", "CROP_MULTIPLE", "expand_env", "packaged_config", "preset_overrides",
                 "parse_override", "set_path", "read_yaml", "dump_config"):
        assert hasattr(config, name), name
    assert config.PACKAGED_CONFIGS.name == "configs" and config.PACKAGED_CONFIGS.parent.name == "affseg"
    assert config.packaged_config("demo") == config.PACKAGED_CONFIGS / "demo.yaml"
    assert "decoder" in field_comments(config.ModelConfig)["decoder_stages"]
