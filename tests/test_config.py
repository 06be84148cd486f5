from pathlib import Path

import pytest
import yaml

from flywheel.config import ConfigError, load_project
from tests.conftest import EXAMPLE, example_config


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "flywheel.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_example_config_is_valid_and_stores_default_to_sqlite_under_home(tmp_path):
    project = load_project(EXAMPLE, env={"FLYWHEEL_HOME": str(tmp_path)})
    assert project.config.model.type == "lightgbm"
    assert project.source_url == f"sqlite:///{tmp_path / 'source.db'}"
    assert project.tracking_url.endswith("mlflow.db")
    assert project.state_url.endswith("state.db")
    assert "term" not in [f.name for f in project.config.features]


def test_wrong_model_type_names_file_field_and_allowed_values(tmp_path):
    cfg = example_config()
    cfg["model"]["type"] = "lgbm"
    with pytest.raises(ConfigError) as err:
        load_project(write(tmp_path, cfg), env={})
    msg = str(err.value)
    assert "flywheel.yaml: model.type:" in msg
    assert "'lightgbm'" in msg and "'sklearn'" in msg and "'torch-mlp'" in msg
    assert "'lgbm'" in msg


def test_unknown_field_and_bad_feature_are_reported_with_their_path(tmp_path):
    cfg = example_config()
    cfg["gate"]["flor"] = 0.5
    cfg["features"][2] = {"name": "x", "kind": "ratio", "numerator": "a"}
    with pytest.raises(ConfigError) as err:
        load_project(write(tmp_path, cfg), env={})
    msg = str(err.value)
    assert "gate.flor: unknown field" in msg
    assert "features.2.denominator: Field required" in msg


def test_window_must_be_ordered(tmp_path):
    cfg = example_config()
    cfg["data"]["window"] = {"start": "2001-01-01", "end": "1999-01-01"}
    with pytest.raises(ConfigError, match=r"data.window: end \(1999-01-01\) must be after start"):
        load_project(write(tmp_path, cfg), env={})


def test_flag_needs_exactly_one_operand(tmp_path):
    cfg = example_config()
    cfg["features"].append({"name": "bad", "kind": "flag", "column": "state", "op": "=="})
    with pytest.raises(ConfigError, match="give exactly one of 'value' or 'other'"):
        load_project(write(tmp_path, cfg), env={})


def test_environment_overrides_nested_fields_with_typed_values(tmp_path):
    env = {"FLYWHEEL_GATE__FLOOR": "0.7", "FLYWHEEL_MODEL__TYPE": "sklearn",
           "FLYWHEEL_STORES__SOURCE": "postgresql://u@h/db", "FLYWHEEL_HOME": str(tmp_path),
           "FLYWHEEL_CACHE_DIR": "/x", "UNRELATED": "1"}
    project = load_project(EXAMPLE, env=env)
    assert project.config.gate.floor == 0.7
    assert project.config.model.type == "sklearn"
    assert project.source_url == "postgresql://u@h/db"


def test_bad_override_is_reported_like_a_file_error(tmp_path):
    with pytest.raises(ConfigError, match="gate.floor"):
        load_project(EXAMPLE, env={"FLYWHEEL_GATE__FLOOR": "high"})


def test_relative_sqlite_url_resolves_next_to_the_config(tmp_path):
    cfg = example_config()
    cfg["stores"]["source"] = "sqlite:///data/src.db"
    project = load_project(write(tmp_path, cfg), env={})
    assert project.source_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'src.db'}"
    assert project.home == (tmp_path / ".flywheel").resolve()


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_project(tmp_path / "nope.yaml", env={})


def test_duplicate_feature_names_are_refused(tmp_path):
    cfg = example_config()
    cfg["features"].append(dict(cfg["features"][0]))
    with pytest.raises(ConfigError, match="repeated: gr_appv"):
        load_project(write(tmp_path, cfg), env={})


def test_lora_config_overrides_apply_to_their_own_kind(tmp_path: Path) -> None:
    from flywheel.config import LlmProject, load_any_project

    lora = tmp_path / "lora.yaml"
    lora.write_text(yaml.safe_dump({"project": "x", "kind": "lora", "gate": {"floor": 50}}))
    env = {"FLYWHEEL_LORA__R": "4", "FLYWHEEL_TRAINING__STEPS": "7", "FLYWHEEL_MODEL__TYPE": "sklearn"}
    project = load_any_project(lora, env=env)
    assert isinstance(project, LlmProject)
    assert project.config.lora.r == 4 and project.config.training.steps == 7
    assert project.config.lora.target_modules == ["q_proj", "v_proj"]
    tabular = load_project(EXAMPLE, env=env)  # LoRA-only variables leave a tabular project alone
    assert tabular.config.model.type == "sklearn"
    with pytest.raises(ConfigError, match="kind"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"project": "x", "kind": "llm", "gate": {"floor": 50}}))
        load_any_project(bad, env={})


def test_lora_example_config_is_valid(tmp_path: Path) -> None:
    from flywheel.config import BUILTIN_BASE_MODEL, load_llm_project

    path = EXAMPLE.parent.parent / "constitution-lora" / "flywheel.yaml"
    project = load_llm_project(path, env={"FLYWHEEL_HOME": str(tmp_path)})
    cfg = project.config
    assert cfg.base_model == BUILTIN_BASE_MODEL and cfg.text.source == "indian-constitution"
    assert cfg.gate.metric == "perplexity" and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.serving.default_max_new_tokens <= cfg.serving.max_new_tokens
    assert cfg.serving.runtime == "llama.cpp" and cfg.gate.max_export_cost is not None
    assert project.tracking_url == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_serving_threads_keeps_its_old_name(tmp_path: Path) -> None:
    from flywheel.config import load_llm_project

    for key in ("threads", "torch_threads"):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({"project": "x", "kind": "lora", "gate": {"floor": 50},
                                        "serving": {key: 3}}))
        assert load_llm_project(path, env={}).config.serving.threads == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"project": "x", "kind": "lora", "gate": {"floor": 50},
                                   "serving": {"runtime": "vllm"}}))
    with pytest.raises(ConfigError, match="runtime"):
        load_llm_project(bad, env={})


def test_hostile_yaml_is_refused_quickly_with_a_reason(tmp_path):
    import time

    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True))
    path = tmp_path / "flywheel.yaml"
    path.write_text("project: p\n" + laughs)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"flywheel.yaml:3: YAML aliases \(\*a\) are not accepted"):
        load_project(path, env={})
    assert time.monotonic() - started < 2  # expanded, it is 9**9 strings

    path.write_bytes("project: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text .*save the file as UTF-8"):
        load_project(path, env={})

    cfg = example_config()
    cfg["features"].append({"name": "big", "kind": "bucket", "column": "gr_appv", "edges": [1.0, 2.0]})
    path.write_text(yaml.safe_dump(cfg).replace("- 2.0", "- .inf"))
    with pytest.raises(ConfigError, match=r"features\.\d+\.edges\.1: \.inf and \.nan are not accepted"):
        load_project(path, env={})


def test_any_override_may_come_from_a_secret_file(tmp_path):
    secret = tmp_path / "state-url"
    secret.write_text("postgresql://flywheel:s3cret@db:5432/flywheel\n")
    path = write(tmp_path, example_config())
    project = load_project(path, env={"FLYWHEEL_STORES__STATE_FILE": str(secret),
                                      "FLYWHEEL_HOME": str(tmp_path / "home")})
    assert project.state_url == "postgresql://flywheel:s3cret@db:5432/flywheel"
    direct = load_project(path, env={"FLYWHEEL_STORES__STATE_FILE": str(secret),
                                     "FLYWHEEL_STORES__STATE": "sqlite:///direct.db"})
    assert direct.state_url.endswith("direct.db")  # a variable set directly wins
    with pytest.raises(Exception, match="FLYWHEEL_STORES__STATE_FILE=.*cannot read the file"):
        load_project(path, env={"FLYWHEEL_STORES__STATE_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(("patch", "message"), [
    ({"segments": [{"name": "region", "column": "region"}]},
     r"segments\[0\].column: 'region' is not an input of the model's features"),
    ({"segments": [{"name": "s", "column": "gr_appv", "edges": [5, 1]}]}, "edges must increase"),
    ({"rollout": {"mode": "canary", "entity": "loan_id"}},
     r"rollout.entity: 'loan_id' is not an input .* meta.KEY"),
    ({"rollout": {"mode": "shadow", "canary_share": 1.5}}, "canary_share"),
])
def test_rollout_and_segments_name_the_field_that_is_wrong(tmp_path, patch, message):
    cfg = {**example_config(), **patch}
    with pytest.raises(ConfigError, match=message):
        load_project(write(tmp_path, cfg), env={})
    meta = {**example_config(), "segments": [{"name": "channel", "column": "meta.channel"}]}
    assert load_project(write(tmp_path, meta), env={}).config.segments[0].column == "meta.channel"
