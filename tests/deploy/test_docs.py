"""The documentation site builds strictly, and the configuration page cannot drift from the settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec

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
    assert set(rows) == {env_name(f) for f in FIELDS} | {"CLERK_SECRET_KEY_FILE"}
    for field in msgspec.structs.fields(Settings):
        default = field.default
        if default is None or default == "" or not isinstance(default, int | float | str):
            continue
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert shown in rows[env_name(field.name)], (field.name, rows[env_name(field.name)])
