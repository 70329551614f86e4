import pytest

from ops.settings import SettingsError, load_settings


def load(env=None, config=None):
    return load_settings(config, environ=env or {}, use_service_state=False)


def test_defaults_are_valid():
    settings = load()
    assert settings.kafka.brokers == ["127.0.0.1:9092"]
    assert settings.sinks == ["parquet", "clickhouse", "quota", "billing", "dlq"]


def test_environment_overrides_toml(tmp_path):
    config = tmp_path / "gatewatch.toml"
    config.write_text('[kafka]\nbootstrap = "k1:9092,k2:9093"\n[windows]\nlength_s = 30\n')
    settings = load({"GATEWATCH_WINDOWS__LENGTH_S": "10", "GATEWATCH_SINKS": "parquet,dlq"}, config)
    assert settings.kafka.brokers == ["k1:9092", "k2:9093"]
    assert settings.windows.length_s == 10
    assert settings.sinks == ["parquet", "dlq"]


@pytest.mark.parametrize("env, says", [
    ({"GATEWATCH_KAFKA__BOOTSTRAP": "http://broker"}, "kafka.bootstrap: expected comma-separated host:port"),
    ({"GATEWATCH_WINDOWS__LENGTH_S": "-5"}, "windows.length_s: Input should be greater than 0"),
    ({"GATEWATCH_SINKS": "parquet,elastic"}, "sinks: unknown sink 'elastic'"),
    ({"GATEWATCH_REDIS__URL": "localhost:6379"}, "redis.url: expected redis://"),
    ({"GATEWATCH_KAFKA__BOGUS": "1"}, "kafka.bogus: unknown setting"),
])
def test_bad_environment_values_name_the_variable(env, says):
    with pytest.raises(SettingsError) as error:
        load(env)
    message = str(error.value)
    assert says in message
    assert f"environment variable {next(iter(env))}" in message


def test_bad_toml_value_names_the_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[windows]\nlength_s = -1\n")
    with pytest.raises(SettingsError, match=r"windows.length_s: .* \(from config file .*bad.toml"):
        load(config=config)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load(config=tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[kafka\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load(config=broken)
