"""The entry points' XLA compilation cache: where it goes, and what turns it off or wins."""

import os

import pytest

from jaxlm.cli import common

_KEYS = ("JAX_COMPILATION_CACHE_DIR", "JAXLM_XLA_CACHE", "XDG_CACHE_HOME")


@pytest.fixture
def env(monkeypatch):
    for key in _KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_default_is_under_the_user_cache(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path))
    common.use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "jaxlm" / "xla")


def test_jaxlm_xla_cache_names_the_folder_or_turns_it_off(env, tmp_path):
    env.setenv("JAXLM_XLA_CACHE", str(tmp_path / "mine"))
    common.use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")
    env.delenv("JAX_COMPILATION_CACHE_DIR")
    env.setenv("JAXLM_XLA_CACHE", "off")
    common.use_compilation_cache()
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ


def test_a_cache_dir_already_set_wins(env, tmp_path):
    env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    env.setenv("JAXLM_XLA_CACHE", str(tmp_path / "mine"))
    common.use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "theirs")
