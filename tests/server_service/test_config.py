"""Settings: environment prefix, nested privacy, defaults, a required admin token."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_core.errors import ConfigError
from server_service.config import Settings, load_settings
from server_service.main import run

TOKEN = "server-admin-token-0123456789"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("FEDINSPECT_SERVER_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_reads_prefixed_env_with_nested_privacy(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FEDINSPECT_SERVER_ADMIN_TOKEN", TOKEN)
    clean_env.setenv("FEDINSPECT_SERVER_PORT", "8123")
    clean_env.setenv("FEDINSPECT_SERVER_CLASS_NAMES", '["ok", "scratch", "dent"]')
    clean_env.setenv("FEDINSPECT_SERVER_PRIVACY__DTYPE", "float16")
    clean_env.setenv("FEDINSPECT_SERVER_PRIVACY__CLIP_NORM", "2.5")
    s = load_settings()
    assert s.admin_token.get_secret_value() == TOKEN
    assert s.port == 8123
    assert s.class_names == ["ok", "scratch", "dent"]
    assert s.privacy.dtype == "float16"
    assert s.privacy.clip_norm == 2.5
    # a wire dtype of rows asks for rows, with the pooled mode's noise
    assert (s.privacy.mode, s.privacy.noise_sigma) == ("pooled", 2.0)
    assert TOKEN not in repr(s)  # the token never shows in logs or tracebacks


def test_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = Settings(admin_token=TOKEN[:16], data_dir=tmp_path)
    assert (s.host, s.port, s.backbone, s.cut, s.input_size) == (
        "127.0.0.1",
        8000,
        "efficientnet_lite0",
        "pooled",
        None,
    )
    assert s.class_names == ["functional", "defective"]
    assert s.min_edges == 1 and s.cycle_deadline_s == 600
    assert s.max_upload_bytes == 256 * 1024 * 1024 and s.max_upload_rows == 100_000
    assert s.sqlalchemy_url == f"sqlite:///{(tmp_path / 'server.db').resolve()}"
    cfg = s.upper_train_config()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.val_fraction, cfg.seed) == (
        s.train_epochs,
        s.train_lr,
        s.train_batch_size,
        s.train_val_fraction,
        s.train_seed,
    )


def test_every_field_is_described() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_missing_admin_token_is_a_clear_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.detail.startswith(
        "invalid server settings: FEDINSPECT_SERVER_ADMIN_TOKEN: Field required"
    )


def test_run_refuses_to_start_without_admin_token(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exc:
        run()
    assert "FEDINSPECT_SERVER_ADMIN_TOKEN: Field required" in str(exc.value.code)


def test_short_admin_token_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FEDINSPECT_SERVER_ADMIN_TOKEN", "short")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "FEDINSPECT_SERVER_ADMIN_TOKEN: Value error, must be at least 16 characters" in (
        err.value.detail
    )
