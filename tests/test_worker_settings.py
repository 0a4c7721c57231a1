"""Worker settings: the shipped TOML files, overrides and rejected values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import DEFAULT_CONFIG_PATH, Settings, SettingsError, load_settings

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("worker*.toml")), ids=lambda path: path.name)
def test_shipped_config_loads(path: Path) -> None:
    settings = load_settings(path, environ={})
    assert isinstance(settings, Settings)


def test_network_config_restricts_callers() -> None:
    settings = load_settings(CONFIG_DIR / "worker-network.toml", environ={})
    assert settings.dicom.host == "0.0.0.0"
    assert settings.dicom.allowed_calling_ae_titles
    assert settings.forward.enabled


def test_shipped_config_defaults() -> None:
    settings = load_settings(DEFAULT_CONFIG_PATH, environ={})
    assert settings.dicom.host == "127.0.0.1"
    assert settings.dicom.port == 11112
    assert settings.dicom.allowed_calling_ae_titles == ()
    assert settings.processing.quiet_period_s == 30.0
    assert settings.export.uid_root is None
    assert not settings.forward.enabled


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[dicom]\nport = 2000\nae_title = "FROMFILE"\n[processing]\nworkers = 3\n')
    environ = {"MAMMO_WORKER_DICOM_PORT": "3000", "MAMMO_WORKER_DICOM_ALLOWED_CALLING_AE_TITLES": "MOD1, PACS"}
    settings = load_settings(config, environ=environ, overrides={"dicom.port": 4000})
    assert settings.dicom.port == 4000
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.allowed_calling_ae_titles == ("MOD1", "PACS")
    assert settings.processing.workers == 3


def test_environment_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[processing]\nquiet_period_s = 10\n")
    settings = load_settings(config, environ={"MAMMO_WORKER_PROCESSING_QUIET_PERIOD_S": "2.5"})
    assert settings.processing.quiet_period_s == 2.5


def test_uid_root_empty_means_none(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[export]\nuid_root = "1.2.826.0.1.3680043.10.1234."\n')
    assert load_settings(config, environ={}).export.uid_root == "1.2.826.0.1.3680043.10.1234."
    assert load_settings(config, environ={"MAMMO_WORKER_EXPORT_UID_ROOT": ""}).export.uid_root is None


def test_forward_destination_enabled(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[forward]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n')
    forward = load_settings(config, environ={}).forward
    assert forward.enabled
    assert (forward.ae_title, forward.host, forward.port) == ("PACS", "127.0.0.1", 104)


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ('[dicom]\nprot = 104\n', ["dicom.prot", "ae_title", "port"]),
        ('[dicomm]\nport = 104\n', ["dicomm", "dicom", "storage", "processing"]),
        ("[dicom]\nport = 70000\n", ["dicom.port", "70000", "1 to 65535"]),
        ('[dicom]\nport = "abc"\n', ["dicom.port", "'abc'", "an integer"]),
        ('[dicom]\nae_title = "A_TITLE_LONGER_THAN_16"\n', ["dicom.ae_title", "A_TITLE_LONGER_THAN_16", "1 to 16"]),
        ('[dicom]\nhost = "not a host"\n', ["dicom.host", "not a host", "IP address"]),
        ("[dicom]\nmax_pdu = 100\n", ["dicom.max_pdu", "100", "4096"]),
        ('[processing]\nthreshold_rule = "median"\n', ["processing.threshold_rule", "median", "checkpoint, mean, specificity"]),
        ("[processing]\nworkers = -1\n", ["processing.workers", "-1", ">= 0"]),
        ("[processing]\nquiet_period_s = 0\n", ["processing.quiet_period_s", "0", "> 0"]),
        ("[processing]\nreduced_decode_min_side = 100\n", ["processing.reduced_decode_min_side", "100", ">= 256"]),
        ('[export]\nuid_root = "1.2.abc."\n', ["export.uid_root", "1.2.abc.", "digits and dots"]),
        ('[forward]\nae_title = "PACS"\n', ["forward.host", "''", "host name"]),
        ("[forward]\nbackoff_initial_s = 10\nbackoff_max_s = 1\n", ["forward.backoff_max_s", "1.0", ">= forward.backoff_initial_s"]),
        ("[storage]\nfree_disk_floor_mb = -5\n", ["storage.free_disk_floor_mb", "-5", ">= 0"]),
    ],
)
def test_bad_setting_rejected(tmp_path: Path, toml: str, fragments: list[str]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(toml)
    with pytest.raises(SettingsError) as caught:
        load_settings(config, environ={})
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message


def test_bad_environment_value_names_variable() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"MAMMO_WORKER_DICOM_PORT": "eleven"})
    message = str(caught.value)
    assert "dicom.port" in message
    assert "MAMMO_WORKER_DICOM_PORT" in message
    assert "'eleven'" in message


def test_unknown_environment_key_rejected() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"MAMMO_WORKER_DICOM_PORTS": "104"})
    assert "dicom.ports" in str(caught.value)
    assert "allowed_calling_ae_titles" in str(caught.value)


def test_missing_config_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_serve_exits_2_on_bad_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.serve", "--data-dir", str(tmp_path), "--port", "99999"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "dicom.port = 99999" in result.stderr
    assert "1 to 65535" in result.stderr
