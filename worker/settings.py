"""Typed settings of the worker: a TOML file, then environment variables, then CLI flags.

Each later source overrides the earlier ones key by key. Environment variables are named
``MAMMO_WORKER_<SECTION>_<KEY>`` in upper case, for example ``MAMMO_WORKER_DICOM_PORT=11113``
sets ``[dicom] port``. List values in environment variables are comma-separated. Every value
is checked when the settings are loaded, so a bad value stops the worker at start with a
message that names the key, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "MAMMO_WORKER_"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "config" / "worker.toml"
THRESHOLD_RULES = ("checkpoint", "mean", "specificity")
# DICOM PS3.5 section 9: a UID has at most 64 characters, digit components separated by
# dots, and no component but a single "0" starts with a zero.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# pydicom 3's generate_uid rejects longer prefixes (the trailing dot included).
MAX_UID_ROOT_LENGTH = 54


class SettingsError(ValueError):
    """A setting has an invalid value or an unknown key."""


@dataclass(frozen=True)
class DicomSettings:
    """The storage SCP: address, AE titles and network limits."""

    ae_title: str = "MAMMOVAE"
    host: str = "127.0.0.1"
    port: int = 11112
    # Calling AE titles allowed to associate. An empty list accepts any peer.
    allowed_calling_ae_titles: tuple[str, ...] = ()
    # Maximum PDU length this SCP receives, in bytes. 0 means no limit.
    max_pdu: int = 262144
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0


@dataclass(frozen=True)
class StorageSettings:
    """Storage of the spool, the results database and the exports."""

    data_dir: str = "./var"
    # C-STORE requests are rejected with Out of Resources (0xA700) below this free space.
    free_disk_floor_mb: int = 1024


@dataclass(frozen=True)
class ProcessingSettings:
    """The processing pool and the model it runs."""

    # Path of a checkpoint file. Empty selects the checkpoint shipped in model/checkpoints.
    checkpoint: str = ""
    # Number of processing threads. 0 receives and spools instances without processing them.
    workers: int = 2
    # torch intra-op threads. 0 divides the CPU cores among the processing threads.
    torch_threads: int = 0
    # "checkpoint" uses the rule stored in the checkpoint's calibration.
    threshold_rule: str = "checkpoint"
    # A study with no new instance for this long is complete even without four scored views.
    quiet_period_s: float = 30.0
    # An instance whose processing was interrupted this many times is marked failed.
    max_attempts: int = 3
    # On shutdown, processing threads get this long to finish, and unfinished work is requeued.
    shutdown_timeout_s: float = 30.0
    # Poll interval of the processing threads when no new instance wakes them.
    poll_interval_s: float = 5.0
    # Large views are decoded at a reduced resolution whose longest side stays at least this
    # many pixels for a 128-pixel model input, scaled with the checkpoint's view size (2048
    # for a 512-pixel patch checkpoint). JPEG 2000 uses resolution levels, other syntaxes
    # area averaging. 0 decodes every view in full, as training does, at the cost of decode time.
    reduced_decode_min_side: int = 512


@dataclass(frozen=True)
class ExportSettings:
    """Secondary Capture objects written for scored views."""

    # Root for derived UIDs such as "1.2.826.0.1.3680043.10.1234.". None derives them
    # under 2.25 (UUID-derived UIDs).
    uid_root: str | None = None


@dataclass(frozen=True)
class ForwardSettings:
    """The C-STORE destination that receives the Secondary Captures (optional)."""

    # An empty ae_title disables forwarding. Otherwise ae_title, host and port are required.
    ae_title: str = ""
    host: str = ""
    port: int = 0
    max_attempts: int = 5
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0

    @property
    def enabled(self) -> bool:
        return bool(self.ae_title)


@dataclass(frozen=True)
class Settings:
    dicom: DicomSettings = field(default_factory=DicomSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    forward: ForwardSettings = field(default_factory=ForwardSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)


SECTIONS: dict[str, type] = {
    "dicom": DicomSettings,
    "storage": StorageSettings,
    "processing": ProcessingSettings,
    "export": ExportSettings,
    "forward": ForwardSettings,
}


def load_settings(
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load and check the settings.

    ``config_path`` None reads ``config/worker.toml`` of the source tree when it exists and
    uses the built-in defaults otherwise. ``environ`` defaults to ``os.environ``.
    ``overrides`` maps dotted keys such as ``"dicom.port"`` to values from CLI flags.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    sources: dict[str, str] = {}

    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    if config_path is not None or path.is_file():
        merge_toml(values, sources, path)
    merge_environment(values, sources, os.environ if environ is None else environ)
    for dotted, value in (overrides or {}).items():
        section, key = split_key(dotted, "command line")
        values[section][key] = value
        sources[dotted] = "command line"

    sections = {}
    for name, section_type in SECTIONS.items():
        converted = {
            key: convert_value(f"{name}.{key}", raw, field_types(section_type)[key], sources[f"{name}.{key}"])
            for key, raw in values[name].items()
        }
        sections[name] = section_type(**converted)
    settings = Settings(**sections)
    check_settings(settings, sources)
    return settings


def merge_toml(values: dict[str, dict[str, Any]], sources: dict[str, str], path: Path) -> None:
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError as err:
        raise SettingsError(f"config file {str(path)!r} not found; pass an existing TOML file with --config") from err
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"config file {str(path)!r} is not valid TOML: {err}") from err

    source = f"config file {path}"
    for section, table in document.items():
        if section not in SECTIONS:
            raise SettingsError(f"unknown section [{section}] in {source}; accepted sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise SettingsError(f"{section!r} in {source} must be a table such as [{section}], got {table!r}")
        for key, value in table.items():
            split_key(f"{section}.{key}", source)
            values[section][key] = value
            sources[f"{section}.{key}"] = source


def merge_environment(values: dict[str, dict[str, Any]], sources: dict[str, str], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        source = f"environment variable {name}"
        if section not in SECTIONS:
            raise SettingsError(
                f"unknown section {section!r} in {source}; accepted: "
                + ", ".join(f"{ENV_PREFIX}{s.upper()}_<KEY>" for s in SECTIONS)
            )
        split_key(f"{section}.{key}", source)
        values[section][key] = raw
        sources[f"{section}.{key}"] = source


def split_key(dotted: str, source: str) -> tuple[str, str]:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise SettingsError(f"unknown section {section!r} in {source}; accepted sections: {', '.join(SECTIONS)}")
    accepted = field_types(SECTIONS[section])
    if key not in accepted:
        raise SettingsError(f"unknown key {dotted!r} in {source}; accepted keys in [{section}]: {', '.join(accepted)}")
    return section, key


def field_types(section_type: type) -> dict[str, str]:
    # The annotations are strings because of ``from __future__ import annotations``.
    return {item.name: str(item.type) for item in dataclasses.fields(section_type)}


def convert_value(key: str, raw: Any, type_name: str, source: str) -> Any:
    """Convert a TOML value, an environment string or a flag value to the field's type."""
    from_text = isinstance(raw, str) and not source.startswith("config file") and type_name != "str"

    def invalid(accepted: str) -> SettingsError:
        return SettingsError(f"invalid setting {key} = {raw!r} (from {source}): expected {accepted}")

    if type_name == "int":
        if from_text:
            try:
                return int(raw.strip())
            except ValueError as err:
                raise invalid("an integer") from err
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise invalid("an integer")
        return raw
    if type_name == "float":
        if from_text:
            try:
                return float(raw.strip())
            except ValueError as err:
                raise invalid("a number") from err
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise invalid("a number")
        return float(raw)
    if type_name == "str":
        if not isinstance(raw, str):
            raise invalid("a string")
        return raw
    if type_name == "str | None":
        if not isinstance(raw, str):
            raise invalid("a string (empty for none)")
        return raw or None
    if type_name == "tuple[str, ...]":
        if isinstance(raw, str):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if not isinstance(raw, (list, tuple)) or not all(isinstance(item, str) for item in raw):
            raise invalid("a list of strings")
        return tuple(raw)
    raise TypeError(f"settings field {key} has the unsupported type {type_name}")


def check_settings(settings: Settings, sources: Mapping[str, str]) -> None:
    """Raise SettingsError for the first value outside its accepted range."""

    def reject(key: str, value: Any, accepted: str) -> SettingsError:
        source = sources.get(key, "built-in default")
        return SettingsError(f"invalid setting {key} = {value!r} (from {source}): expected {accepted}")

    dicom = settings.dicom
    check_ae_title("dicom.ae_title", dicom.ae_title, reject)
    for title in dicom.allowed_calling_ae_titles:
        check_ae_title("dicom.allowed_calling_ae_titles", title, reject)
    check_host("dicom.host", dicom.host, reject)
    check_port("dicom.port", dicom.port, reject)
    if dicom.max_pdu != 0 and not 4096 <= dicom.max_pdu <= 2**32 - 1:
        raise reject("dicom.max_pdu", dicom.max_pdu, "0 (no limit) or a length from 4096 to 4294967295 bytes")
    for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
        check_positive(f"dicom.{name}", getattr(dicom, name), reject)

    storage = settings.storage
    if not storage.data_dir:
        raise reject("storage.data_dir", storage.data_dir, "a directory path")
    if storage.free_disk_floor_mb < 0:
        raise reject("storage.free_disk_floor_mb", storage.free_disk_floor_mb, "an integer >= 0 (megabytes)")

    processing = settings.processing
    if processing.workers < 0:
        raise reject("processing.workers", processing.workers, "an integer >= 0 (0 pauses processing)")
    if processing.torch_threads < 0:
        raise reject("processing.torch_threads", processing.torch_threads, "an integer >= 0 (0 chooses)")
    if processing.threshold_rule not in THRESHOLD_RULES:
        raise reject("processing.threshold_rule", processing.threshold_rule, f"one of {', '.join(THRESHOLD_RULES)}")
    if processing.max_attempts < 1:
        raise reject("processing.max_attempts", processing.max_attempts, "an integer >= 1")
    if processing.reduced_decode_min_side != 0 and processing.reduced_decode_min_side < 256:
        raise reject(
            "processing.reduced_decode_min_side",
            processing.reduced_decode_min_side,
            "0 (always decode in full) or an integer >= 256",
        )
    for name in ("quiet_period_s", "shutdown_timeout_s", "poll_interval_s"):
        check_positive(f"processing.{name}", getattr(processing, name), reject)

    uid_root = settings.export.uid_root
    if uid_root is not None:
        if not uid_root.endswith(".") or not UID_PATTERN.match(uid_root[:-1]) or len(uid_root) > MAX_UID_ROOT_LENGTH:
            raise reject(
                "export.uid_root",
                uid_root,
                f"an empty string (2.25 UIDs) or a UID root of digits and dots ending with '.', at most "
                f"{MAX_UID_ROOT_LENGTH} characters, such as '1.2.826.0.1.3680043.10.1234.'",
            )

    forward = settings.forward
    if forward.enabled:
        check_ae_title("forward.ae_title", forward.ae_title, reject)
        check_host("forward.host", forward.host, reject)
        check_port("forward.port", forward.port, reject)
    if forward.max_attempts < 1:
        raise reject("forward.max_attempts", forward.max_attempts, "an integer >= 1")
    check_positive("forward.backoff_initial_s", forward.backoff_initial_s, reject)
    if forward.backoff_max_s < forward.backoff_initial_s:
        raise reject(
            "forward.backoff_max_s", forward.backoff_max_s, f"a number >= forward.backoff_initial_s ({forward.backoff_initial_s})"
        )


def check_ae_title(key: str, value: str, reject: Any) -> None:
    # DICOM PS3.5 table 6.2-1: AE is 1 to 16 characters of the default repertoire without
    # backslash or control characters, and not only spaces.
    stripped = value.strip()
    if not 1 <= len(value) <= 16 or not stripped or "\\" in value or not all(32 <= ord(c) < 127 for c in value):
        raise reject(key, value, "an AE title of 1 to 16 printable ASCII characters without backslash")


def check_host(key: str, value: str, reject: Any) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value or ""):
        raise reject(key, value, "an IP address such as 127.0.0.1 or 0.0.0.0, or a host name")


def check_port(key: str, value: int, reject: Any) -> None:
    if not 1 <= value <= 65535:
        raise reject(key, value, "a TCP port from 1 to 65535")


def check_positive(key: str, value: float, reject: Any) -> None:
    if not value > 0:
        raise reject(key, value, "a number of seconds > 0")
