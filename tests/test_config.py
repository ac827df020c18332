"""Config: key sources, `${ENV}` expansion, defaults, and errors that name their field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, Secret, default_config, load_config, parse_config

KEYS = [{"name": "a", "key": "sk-inline-000000001"}]


def parse(doc: dict[str, Any], env: dict[str, str] | None = None, base: Path | None = None) -> Any:
    return parse_config(doc, env=env or {}, base_dir=base)


def test_example_config_is_valid(tmp_path: Path) -> None:
    key_file = tmp_path / ".agnes_api_key"
    key_file.write_text("sk-from-file-0000000001\n")
    env = {
        "HOME": str(tmp_path),
        "AGNES_KEY_SPARE": "sk-from-env-00000000002",
        "GATEWAY_TOKEN_TEAM_A": "team-a-token-0123456789",
        "GATEWAY_ADMIN_TOKEN": "admin-token-0123456789",
    }
    example = Path(__file__).parent.parent / "config.example.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path))
        config = load_config(example, env=env)
    assert [k.name for k in config.keys] == ["primary", "spare"]
    assert config.keys[0].secret.reveal() == "sk-from-file-0000000001"
    assert config.keys[1].secret.reveal() == "sk-from-env-00000000002"
    assert config.clients[0].token.reveal() == "team-a-token-0123456789"


def test_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "k").write_text("  sk-file-key-000000003 \n")
    config = parse(
        {
            "keys": [
                {"name": "inline", "key": "sk-inline-000000001"},
                {"name": "env", "key_env": "MY_KEY"},
                {"name": "file", "key_file": "~/k", "daily_limit": 50, "priority": 2},
            ]
        },
        env={"MY_KEY": "sk-env-key-0000000002"},
    )
    assert [k.secret.reveal() for k in config.keys] == [
        "sk-inline-000000001",
        "sk-env-key-0000000002",
        "sk-file-key-000000003",
    ]
    assert (config.keys[2].daily_limit, config.keys[2].priority) == (50, 2)
    assert config.keys[0].daily_limit is None


def test_zero_config_uses_the_guides_key_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="agnes_api_key"):
        default_config({})
    (tmp_path / ".agnes_api_key").write_text("sk-main-000000000001\n")
    assert [k.name for k in default_config({}).keys] == ["primary"]
    (tmp_path / ".agnes_api_key_old").write_text("sk-old-0000000000002\n")
    config = load_config(None, env={})
    assert [(k.name, k.priority) for k in config.keys] == [("primary", 0), ("backup", 1)]
    assert config.upstream.base_url == "https://apihub.agnes-ai.com"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"keys": KEYS, "bogus": 1}, "bogus"),
        ({"keys": [{"name": "a", "key": "sk-1", "colour": "red"}]}, "keys[0].colour"),
        ({"keys": [*KEYS, {"name": "a", "key": "sk-other-00000001"}]}, "keys[1].name"),
        ({"keys": [{"name": "a"}]}, "keys[0]"),
        ({"keys": [{"name": "a", "key": "x", "key_env": "Y"}]}, "keys[0]"),
        ({"keys": [{"name": "a", "key_env": "NOPE"}]}, "keys[0].key_env"),
        ({"keys": [{"name": "a", "key_file": "/does/not/exist"}]}, "keys[0].key_file"),
        ({"keys": KEYS, "quota": {"timezone": "Mars/Olympus"}}, "quota.timezone"),
        ({"keys": KEYS, "quota": {"reset_time": "25:00"}}, "quota.reset_time"),
        ({"keys": KEYS, "listen": {"port": 70000}}, "listen.port"),
        ({"keys": KEYS, "listen": {"port": "80"}}, "listen.port"),
        ({"keys": []}, "keys"),
        ({"keys": [{"name": "a", "key": "sk-1", "daily_limit": -1}]}, "keys[0].daily_limit"),
        ({"keys": KEYS, "clients": [{"name": "c", "token": "short"}]}, "clients[0].token"),
        ({"keys": KEYS, "clients": [{"name": "c", "token": "sk-inline-000000001"}]}, "clients[0].token"),
        ({"keys": KEYS, "upstream": {"base_url": "ftp://x"}}, "upstream.base_url"),
        ({"keys": KEYS, "upstream": {"quota_pattern": "("}}, "upstream.quota_pattern"),
        ({"keys": KEYS, "log": {"format": "xml"}}, "log.format"),
        ({"keys": KEYS, "admin_token": "${UNSET_VAR}"}, "admin_token"),
        ({"keys": KEYS, "clients": [{"name": "c", "token": "t" * 20, "daily_limit": -1}]}, "clients[0].daily_limit"),
        ({"keys": KEYS, "clients": [{"name": "c", "token": "t" * 20, "daily_limit": "9"}]}, "clients[0].daily_limit"),
        ({"keys": KEYS, "shutdown": {"drain_s": 0}}, "shutdown.drain_s"),
        ({"keys": KEYS, "shutdown": {"grace": 1}}, "shutdown.grace"),
        ({"keys": KEYS, "poll": {"freshness_s": -1}}, "poll.freshness_s"),
        ({"keys": KEYS, "poll": {"terminal_cache": "yes"}}, "poll.terminal_cache"),
        ({"keys": KEYS, "poll": {"fresh": 1}}, "poll.fresh"),
        ({"keys": KEYS, "retention": {"days": -3}}, "retention.days"),
        ({"keys": KEYS, "retention": {"interval_s": 0}}, "retention.interval_s"),
        ({"keys": KEYS, "retention": {"batch": 0}}, "retention.batch"),
    ],
)
def test_errors_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_env_expansion_in_any_string() -> None:
    config = parse(
        {"keys": [{"name": "a", "key": "${K}"}], "database": "/var/lib/${APP}/g.db", "admin_token": "${ADMIN:-}"},
        env={"K": "sk-expanded-000000001", "APP": "gw"},
    )
    assert config.keys[0].secret.reveal() == "sk-expanded-000000001"
    assert config.database == "/var/lib/gw/g.db"
    assert config.admin_token is None


def test_relative_database_is_beside_the_config_file(tmp_path: Path) -> None:
    assert parse({"keys": KEYS, "database": "g.db"}, base=tmp_path).database == str(tmp_path / "g.db")


def test_secrets_never_print() -> None:
    secret = Secret("sk-very-secret-value-1234")
    config = parse({"keys": [{"name": "a", "key": secret.reveal()}], "clients": [{"name": "c", "token": "t" * 20}]})
    assert "sk-very-secret" not in repr(config) and "t" * 20 not in repr(config)
    assert secret.masked() == "…1234"


def test_openai_and_archive_sections(tmp_path: Path) -> None:
    default = parse({"keys": KEYS})
    assert (default.openai.frame_rate, default.openai.poll_after_ms, default.archive.dir) == (24, 5000, None)
    assert default.openai.upstream_model("sora-2-pro") == "agnes-video-v2.0"
    assert default.openai.upstream_model(None) == "agnes-video-v2.0"
    config = parse(
        {
            "keys": KEYS,
            "openai": {"frame_rate": 30, "models": {"sora-2": "agnes-video-v2.1"}, "image_field": "images"},
            "archive": {"dir": "videos"},
        },
        base=tmp_path,
    )
    assert config.openai.upstream_model("sora-2") == "agnes-video-v2.1"
    assert config.openai.upstream_model("agnes-video-v2.0") == "agnes-video-v2.0"  # unlisted names pass as they are
    assert (config.openai.frame_rate, config.openai.image_field) == (30, "images")
    assert config.archive.dir == str(tmp_path / "videos")


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"openai": {"frame_rate": 0}}, "openai.frame_rate"),
        ({"openai": {"models": ["sora-2"]}}, "openai.models"),
        ({"openai": {"image_format": "base64"}}, "openai.image_format"),
        ({"openai": {"image_field": "two words"}}, "openai.image_field"),
        ({"openai": {"poll_after_ms": -1}}, "openai.poll_after_ms"),
        ({"openai": {"colour": "red"}}, "openai.colour"),
        ({"archive": {"dir": 5}}, "archive.dir"),
        ({"archive": {"path": "x"}}, "archive.path"),
    ],
)
def test_openai_and_archive_errors_name_the_field(section: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"keys": KEYS, **section})
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_client_limits_and_drain_time() -> None:
    config = parse(
        {
            "keys": KEYS,
            "clients": [{"name": "c", "token": "t" * 20, "daily_limit": 7}, {"name": "d", "token": "u" * 20}],
            "shutdown": {"drain_s": 2.5},
        }
    )
    assert [c.daily_limit for c in config.clients] == [7, None]
    assert config.shutdown.drain_s == 2.5
    assert parse({"keys": KEYS}).shutdown.drain_s == 30.0


def test_yaml_errors_do_not_quote_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("keys:\n  - {name: a, key: sk-secret-never-shown-01\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 3" in str(info.value)
    assert "sk-secret" not in str(info.value)


def test_limits_and_resilience_sections() -> None:
    config = parse(
        {
            "keys": KEYS,
            "limits": {"max_concurrent_upstream": 8, "max_queued": 0, "body_read_timeout_s": 2.5, "idle_timeout_s": 5},
            "resilience": {"poll_retries": 0, "breaker_failures": 0, "breaker_open_s": 12},
        }
    )
    assert (config.limits.max_concurrent_upstream, config.limits.max_queued) == (8, 0)
    assert (config.limits.body_read_timeout_s, config.limits.idle_timeout_s) == (2.5, 5.0)
    assert config.limits.queue_timeout_s == 10.0 and config.limits.max_body_bytes == 20 * 1024 * 1024
    assert (config.resilience.poll_retries, config.resilience.breaker_failures) == (0, 0)
    assert config.resilience.breaker_open_s == 12.0 and config.resilience.poll_backoff_s == 0.2


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("limits", {"max_concurrent_upstream": 0}, "limits.max_concurrent_upstream"),
        ("limits", {"max_queued": -1}, "limits.max_queued"),
        ("limits", {"max_body_bytes": 1.5}, "limits.max_body_bytes"),
        ("limits", {"body_read_timeout_s": 0}, "limits.body_read_timeout_s"),
        ("limits", {"idle_timeout_s": "long"}, "limits.idle_timeout_s"),
        ("limits", {"queue_timeout": 1}, "limits.queue_timeout"),
        ("resilience", {"poll_retries": True}, "resilience.poll_retries"),
        ("resilience", {"poll_retry_budget_s": -1}, "resilience.poll_retry_budget_s"),
        ("resilience", {"breaker_failures": -2}, "resilience.breaker_failures"),
        ("resilience", {"breaker": 3}, "resilience.breaker"),
    ],
)
def test_limits_and_resilience_errors_name_the_field(section: str, value: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"keys": KEYS, section: value})
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_poll_and_retention_defaults_and_overrides() -> None:
    config = parse({"keys": KEYS})
    assert (config.poll.freshness_s, config.poll.terminal_cache) == (1.0, True)
    assert (config.retention.days, config.retention.interval_s, config.retention.batch) == (30.0, 3600.0, 1000)
    config = parse(
        {
            "keys": KEYS,
            "poll": {"freshness_s": 0, "terminal_cache": False},
            "retention": {"days": 0, "interval_s": 60, "batch": 50},
        }
    )
    assert (config.poll.freshness_s, config.poll.terminal_cache) == (0.0, False)
    assert (config.retention.days, config.retention.interval_s, config.retention.batch) == (0.0, 60.0, 50)


def test_listen_workers_default_to_one_and_must_be_whole() -> None:
    assert parse({"keys": KEYS}).listen.workers == 1
    assert parse({"keys": KEYS, "listen": {"workers": 4}}).listen.workers == 4
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match=r"listen\.workers"):
            parse({"keys": KEYS, "listen": {"workers": bad}})
