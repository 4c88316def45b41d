"""`swu-delivery serve` refuses a bad config file at start-up with one clear line, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from swu_delivery.config import load_config

SG = """
[[esp]]
name = "{name}"
kind = "sendgrid"
api_key_env = "SWU_TEST_CONFIG_KEY"
{more}
"""


def serve_with(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "swu.toml"
    config.write_text(f'listen = "127.0.0.1:0"\ndata_dir = "{tmp_path / "data"}"\n{text}')
    return subprocess.run(
        [sys.executable, "-m", "swu_delivery", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SWU_TEST_CONFIG_KEY": "k-secret-123", "PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[esp]\nname = "a"\nkind = "sendgrid"\n', "write [[esp]], not [esp]"),
        (SG.format(name="a", more='kind2 = "x"'), "esp a: unknown key 'kind2' for kind 'sendgrid'"),
        (
            SG.format(name="a", more="").replace("sendgrid", "postmark")
            + 'message_strem = "outbound"\n',
            "unknown key 'message_strem' for kind 'postmark' (its own keys: message_stream)",
        ),
        (SG.format(name="a", more="").replace("sendgrid", "nope"), "unknown ESP kind 'nope'"),
        (
            '[delivery]\ndefault_esp = "b"\n' + SG.format(name="a", more=""),
            "delivery.default_esp: no ESP account named 'b' (accounts: a)",
        ),
        ("idempotency_ttl = 3600\n", "idempotency_ttl: 3600 s is below the guaranteed 86400 s"),
        (
            SG.format(name="a", more='api_key = "k-secret-123"'),
            "esp[0].api_key: put it in api_key_env or api_key_file",
        ),
        ('log_level = "LOUD"\n', "log_level: one of debug, info, warning, error, critical"),
        ('log_format = "xml"\n', "log_format: one of json, text, auto, not 'xml'"),
    ],
    ids=[
        "esp-table",
        "unknown-key",
        "typo-option",
        "unknown-kind",
        "default-esp",
        "ttl",
        "key",
        "log-level",
        "log-format",
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    """No traceback, the key named, and never the API key's value."""
    done = serve_with(tmp_path, text)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert "k-secret-123" not in done.stderr + done.stdout


def test_default_esp_is_the_first_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A [delivery] table without default_esp sends through the first [[esp]] account."""
    monkeypatch.setenv("SWU_TEST_CONFIG_KEY", "k")
    config = tmp_path / "swu.toml"
    config.write_text("[delivery]\nmax_attempts = 3\n" + SG.format(name="main", more=""))
    loaded = load_config(config)
    assert (loaded.delivery.default_esp, loaded.delivery.max_attempts) == ("main", 3)
    assert not loaded.simulator.enabled


def test_log_flags_override_the_file_and_are_checked(tmp_path: Path) -> None:
    """serve --log-level/--log-format win over the config file; a bad value is one clear line."""
    config = tmp_path / "swu.toml"
    config.write_text('log_level = "INFO"\nlog_format = "json"\n')
    loaded = load_config(config, log_level="debug", log_format="text")
    assert (loaded.log_level, loaded.log_format) == ("debug", "text")
    command = [sys.executable, "-m", "swu_delivery", "serve", "--config", str(config)]
    done = subprocess.run(
        [*command, "--log-level", "chatty"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "log_level: one of debug" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
