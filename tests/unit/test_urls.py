"""Local paths as URLs: a folder whose name a URL must quote stays that folder, in every engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdfleet.bus.backends.sqlite import path_from_url
from sdfleet.errors import ConfigError
from sdfleet.settings import Settings
from sdfleet.storage.backends.local import file_path
from sdfleet.store.backends._sqlite_file import sqlite_path
from sdfleet.urls import file_url, http_base, sqlite_file, sqlite_url

ODD = "my #1 50% fleet?"


def test_a_data_dir_with_odd_characters_keeps_everything_inside_it(tmp_path: Path) -> None:
    data = tmp_path / ODD / "data"
    settings = Settings(data_dir=data)
    assert settings.bus == f"sqlite:///{tmp_path}/my%20%231%2050%25%20fleet%3F/data/sdfleet.db"
    # the bus and the task store read the same file from it; the images go under the data dir
    assert path_from_url(settings.bus) == sqlite_path(settings.store) == str(data / "sdfleet.db")
    assert settings.storage_url is not None
    assert file_path(settings.storage_url) == data / "files"


def test_urls_of_paths_read_back_as_the_same_paths(tmp_path: Path) -> None:
    path = tmp_path / ODD / "x.db"
    assert sqlite_file(sqlite_url(path)) == str(path)
    assert file_path(file_url(path.parent)) == path.parent
    assert sqlite_file("sqlite:///rel/x.db") == "rel/x.db"  # three slashes: from the working directory
    assert sqlite_file("sqlite://") is None  # in memory
    assert path_from_url("sqlite://") == ":memory:"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sqlite:////tmp/my #1/x.db", "write ? and # in its path as %3F and %23"),  # was: the file /tmp/my
        ("sqlite:////tmp/x.db?mode=ro", "write ? and # in its path as %3F and %23"),  # was: ignored
        ("sqlite:////tmp/x.db?", "write ? and # in its path as %3F and %23"),
        ("sqlite://host/x.db", "use sqlite:///relative.db or sqlite:////abs/path.db"),
        ("redis://x/0", "not a sqlite URL"),
    ],
)
def test_a_sqlite_url_that_would_name_another_file_is_refused(url: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        sqlite_file(url)
    assert words in str(raised.value)


def test_the_task_store_wants_a_file() -> None:
    for url in ("sqlite://", "sqlite:///"):
        with pytest.raises(ConfigError) as raised:
            sqlite_path(url)
        assert "sqlite URL without a file" in str(raised.value)


def test_a_file_url_that_would_name_another_folder_is_refused() -> None:
    for url in ("file:///tmp/my #1/files", "file:///tmp/files?x=1"):
        with pytest.raises(ConfigError) as raised:
            file_path(url)
        assert "write ? and # in its path as %3F and %23" in str(raised.value)


def test_http_base() -> None:
    assert http_base("http://127.0.0.1:8080/", "--api") == "http://127.0.0.1:8080"
    for bad in ("localhost:8080", "ftp://x", "http://"):
        with pytest.raises(ConfigError) as raised:
            http_base(bad, "--api")
        assert str(raised.value) == f"--api {bad!r}: use http://host:port (or https://)"
