"""Keys, money, estimation, errors, settings and the public API (pure)."""

from __future__ import annotations

import pickle
from decimal import Decimal

import pytest

import aimesh_tasks
from aimesh_tasks import keys
from aimesh_tasks.errors import AimeshError, ConfigError, NoEndpointAvailable
from aimesh_tasks.estimation import estimate_input_tokens
from aimesh_tasks.money import call_cost_nusd, nusd_to_usd, usd_to_nusd
from aimesh_tasks.settings import Settings, load_settings


def test_key_and_queue_formats_are_pinned() -> None:
    assert keys.ROUTE_QUEUE == "aimesh.route"
    assert keys.IDLE_QUEUE == "aimesh.idle"
    assert keys.endpoint_queue("gpt-mini") == "aimesh.endpoint.gpt-mini"
    assert keys.endpoint_id_of_queue("aimesh.endpoint.gpt-mini") == "gpt-mini"
    assert keys.endpoint_id_of_queue("aimesh.route") is None
    assert keys.live_stats("e") == "aimesh:live:e:stats"
    assert keys.live_window("e") == "aimesh:live:e:window"
    assert keys.live_inflight("e") == "aimesh:live:e:inflight"
    assert keys.registry_version() == "aimesh:registry:version"
    assert keys.outbox() == "aimesh:outbox"
    assert keys.outbox_lock() == "aimesh:outbox:lock"
    assert keys.call_key("m1", 2) == "m1:2"
    assert keys.call_journal("m1:2") == "aimesh:journal:m1:2"
    assert keys.failpoint("before_settle") == "aimesh:failpoint:before_settle"
    assert keys.cache_entry("k") == "aimesh:cache:k"
    assert keys.flight("k") == "aimesh:flight:k"
    assert keys.flight_followers("k") == "aimesh:flight:k:followers"
    assert keys.flight_tokens() == "aimesh:flight:tokens"
    assert keys.dedup_counters() == "aimesh:dedup:counters"
    assert keys.semantic_index("agent:a") == "aimesh:semantic:agent:a:index"
    assert keys.semantic_entry("agent:a", "e1") == "aimesh:semantic:agent:a:entry:e1"
    assert keys.metered_agents() == "aimesh:budgets:metered"
    assert keys.metered_agents_ready() == "aimesh:budgets:metered:ready"
    assert keys.message_stream("m1") == "aimesh:stream:m1"
    assert keys.stream_gone("m1") == "aimesh:stream:m1:gone"
    assert keys.streams_gone_channel() == "aimesh:streams:gone"
    assert keys.stream_reader_wake("r1") == "aimesh:stream-reader:r1:wake"
    assert keys.workflow_cancelled("r1") == "aimesh:workflow:r1:cancelled"


def test_money_is_exact_and_rounds_costs_up() -> None:
    assert usd_to_nusd("0.00015") == 150_000
    assert nusd_to_usd(150_000) == Decimal("0.00015")
    assert call_cost_nusd(1, 0, 1, 0) == 1  # 0.001 nano-USD rounds up to 1
    assert call_cost_nusd(1000, 500, 150_000, 600_000) == 150_000 + 300_000
    with pytest.raises(ValueError, match="not a float"):
        usd_to_nusd(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1e-9"):
        usd_to_nusd("0.0000000001")
    with pytest.raises(ValueError, match="0 or more"):
        usd_to_nusd("-1")
    with pytest.raises(ValueError, match="not a decimal"):
        usd_to_nusd("ten")


def test_input_estimate_never_undercounts_bytes() -> None:
    chat = [{"role": "user", "content": "héllo wörld"}]
    assert estimate_input_tokens(chat) >= len("héllo wörld".encode())
    assert estimate_input_tokens(chat + chat) > estimate_input_tokens(chat)


def test_errors_survive_celery_json_round_trip() -> None:
    error = NoEndpointAvailable("none fits", message_id="m1", excluded={"a": "disabled"})
    rebuilt = type(error)(*error.args)
    assert rebuilt.excluded == {"a": "disabled"} and str(rebuilt) == "none fits"
    assert pickle.loads(pickle.dumps(error)).to_dict() == error.to_dict()
    assert isinstance(rebuilt, AimeshError)


def test_defaults_are_the_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BROKER_URL", "RESULT_BACKEND", "REDIS_URL", "DATABASE_URL"):
        monkeypatch.delenv(f"AIMESH_{name}", raising=False)
    settings = Settings()
    assert settings.embedded
    assert settings.database_url.startswith("sqlite:")
    assert settings.redis_url == "memory://"


def test_original_dedup_ttl_name_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUP_TTL_SECS", "42")
    assert Settings().dedup_ttl_secs == 42
    monkeypatch.setenv("AIMESH_DEDUP_TTL_SECS", "7")
    assert Settings().dedup_ttl_secs == 7


def test_invalid_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMESH_ROUTE_WEIGHT_COST", "cheap")
    with pytest.raises(ConfigError, match="AIMESH_ROUTE_WEIGHT_COST"):
        load_settings()


def test_soft_limit_must_be_below_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMESH_TASK_SOFT_TIME_LIMIT_S", "100")
    monkeypatch.setenv("AIMESH_TASK_TIME_LIMIT_S", "50")
    with pytest.raises(ConfigError, match="AIMESH_TASK_SOFT_TIME_LIMIT_S"):
        load_settings()


def test_visibility_timeout_must_exceed_hard_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from aimesh_tasks.app import check_delivery_settings
    from aimesh_tasks.settings import reset_settings

    monkeypatch.setenv("AIMESH_BROKER_URL", "redis://127.0.0.1:6379/14")
    monkeypatch.setenv("AIMESH_VISIBILITY_TIMEOUT_S", "60")
    monkeypatch.setenv("AIMESH_TASK_TIME_LIMIT_S", "90")
    reset_settings()
    try:
        with pytest.raises(ConfigError) as caught:
            check_delivery_settings()
        assert "AIMESH_VISIBILITY_TIMEOUT_S" in str(caught.value)
        assert "AIMESH_TASK_TIME_LIMIT_S" in str(caught.value)
    finally:
        monkeypatch.undo()
        reset_settings()
    check_delivery_settings()


def test_public_api_is_exactly_what_all_lists() -> None:
    public = {name for name in dir(aimesh_tasks) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(aimesh_tasks, name)).__name__ == "module"}
    assert public - modules == set(aimesh_tasks.__all__)
