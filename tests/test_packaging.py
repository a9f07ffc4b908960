"""Packaging: the license users see is MIT, as an SPDX string with a LICENSE file beside it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_license_is_an_spdx_string_with_the_mit_text_beside_it():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"  # the table form {text = ...} is deprecated
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # the first to read SPDX strings
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) the selfextend authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
