"""The documentation site builds strictly, and the configuration page cannot drift from the settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec

from service import cli
from service.amqp.topology import declared_queues
from service.config import FIELDS, Settings, env_name

ROOT = Path(__file__).parents[2]


def test_the_site_builds_with_mkdocs_strict(tmp_path: Path) -> None:
    """Broken links, missing anchors, pages outside the nav: each fails the build."""
    result = subprocess.run(  # noqa: S603 - a dev tool, fixed arguments
        [str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "operations" / "index.html").exists()


def test_the_configuration_page_has_every_setting_with_its_default() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", page, re.MULTILINE))
    assert set(rows) == {env_name(f) for f in FIELDS}
    for field in msgspec.structs.fields(Settings):
        default = field.default
        if default is None or default == "" or not isinstance(default, int | float | str):
            continue
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert shown in rows[env_name(field.name)], (field.name, rows[env_name(field.name)])


def test_the_topology_table_names_every_queue_the_workers_declare() -> None:
    page = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    table = page.split("## Topology", 1)[1].split("\n## ", 1)[0]
    defaults = Settings()
    declared = set(declared_queues(defaults)) | {defaults.audit_archive}
    named = {env_name(f) for f in FIELDS if isinstance(getattr(defaults, f), str) and getattr(defaults, f) in declared}
    assert len(named) == len(declared)
    for name in named:
        assert f"`{name}`" in table, name


def test_the_commands_said_to_take_every_setting_do_and_no_other() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    sentence = page.split("an option of the commands that", 1)[1].split("(`AMQP_URL`", 1)[0]
    said = set(re.findall(r"`([a-z-]+)`", sentence))
    taking = {
        name
        for name, command in cli.main.commands.items()  # type: ignore[attr-defined]
        if any("--amqp-url" in getattr(option, "opts", ()) for option in command.params)
    }
    assert said == taking
    assert "SIGHUP** reloads the policy file" in page


def test_every_warning_and_error_the_code_logs_is_in_the_operators_table() -> None:
    logs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8").split("## Logs", 1)[1]
    code = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "service").rglob("*.py"))
    events = set(re.findall(r'log\.(?:warning|error|critical|exception)\(\s*"([a-z_]+)"', code))
    assert len(events) > 30
    assert {event for event in events if f"`{event}`" not in logs} == set()
