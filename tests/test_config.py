import json

import pytest

from hpelib import paths
from hpelib.config import PROFILES, Config, config_from_dict, make_config
from hpelib.workbook import open_run


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_is_valid_and_round_trips(profile):
    cfg = make_config(profile)
    assert cfg.profile == profile
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.digest() == cfg.digest()


def test_defaults_describe_the_quick_profile_and_default_is_a_short_list_over_them():
    assert make_config("quick") == Config(profile="quick")
    default = make_config("default")
    assert default.model.tiny_spec and default.base.freeze_vision and not default.lora.target_vision
    assert default.merge == Config().merge and default.eval == Config().eval


def test_overrides_apply_and_none_is_ignored():
    cfg = make_config("smoke", {"lora.rank": 4, "merge.wta_thresholds": [0.99], "lora.alpha": None})
    assert cfg.lora.rank == 4
    assert cfg.merge.wta_thresholds == [0.99]
    assert cfg.lora.alpha == make_config("smoke").lora.alpha
    # None never hides a profile's own value (a notebook passes its unset parameters as None)
    assert make_config("smoke", {"data.n_train": None}).data.n_train == make_config("smoke").data.n_train != Config().data.n_train


def test_nested_override_reaches_lora_training():
    assert make_config("default", {"lora.train.lr": 1e-4}).lora.train.lr == 1e-4


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("merge.wta_thresholds", [1.5], ["merge.wta_thresholds", "1.5", "(0, 1]"]),
        ("merge.wta_reference", "cosine", ["merge.wta_reference", "'cosine'", "base", "pairwise"]),
        ("lora.rank", 0, ["lora.rank", "0", "positive integer"]),
        ("lora.train.autocast_bf16", "yes", ["lora.train.autocast_bf16", "'yes'", "true or false"]),
        ("lora.adapters", {"hpe": 1.5}, ["lora.adapters['hpe']", "1.5"]),
        ("data.image_size", 100, ["data.image_size", "100", "multiple of 16"]),
        ("data.test_domains", ["biwi"], ["data.test_domains", "'biwi'", "synth-aflw"]),
        ("model.backend", "llava", ["model.backend", "'llava'", "tiny"]),
    ],
)
def test_bad_values_name_field_value_and_allowed(key, value, words):
    with pytest.raises(ValueError) as err:
        make_config("default", {key: value})
    for w in words:
        assert w in str(err.value)


def test_unknown_key_and_profile_are_named():
    with pytest.raises(ValueError, match="unknown config key 'lora.rnk'.*rank"):
        make_config("default", {"lora.rnk": 3})
    with pytest.raises(ValueError, match="unknown config key 'lorra.rank'"):
        make_config("default", {"lorra.rank": 3})
    with pytest.raises(ValueError, match="profile must be one of .*'tiny'"):
        make_config("tiny")


def test_hub_backend_needs_a_model_id():
    with pytest.raises(ValueError, match="model.model_id"):
        make_config("quick", {"model.backend": "qwen2_vl"})


def test_digest_tracks_only_named_sections():
    a = make_config("smoke")
    b = make_config("smoke", {"merge.ta_lambdas": [0.25]})
    assert a.digest("data", "base") == b.digest("data", "base")
    assert a.digest("merge") != b.digest("merge")


def test_open_run_records_config_and_merges_stage_metrics(run_root):
    run = open_run("r1", "smoke", {"lora.rank": 2})
    assert run.dir == run_root / "r1"
    saved = json.loads((run.dir / paths.RUN_CONFIG).read_text())
    assert saved["lora"]["rank"] == 2 and saved["profile"] == "smoke"
    run.save_metrics("a", {"x/synth-train/mae_mean": 3.5})
    run.save_metrics("b", {"y/synth-aflw/valid_rate": 1.0})
    assert run.load_metrics() == {"x/synth-train/mae_mean": 3.5, "y/synth-aflw/valid_rate": 1.0}
    with pytest.raises(ValueError, match="not a flat"):
        run.save_metrics("c", {"nested": {"a": 1}})
    # what was written before the bad call is intact
    assert run.load_metrics()["x/synth-train/mae_mean"] == 3.5
