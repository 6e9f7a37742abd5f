"""Where runs, searches and models live: a local folder or a URI (``s3://``, ``gs://``, ``file://``).

One code path for both, through pyarrow's filesystems (what Ray Train and Tune use for their own
``storage_path``). A URI keeps its query options — ``s3://key:secret@bucket/runs?endpoint_override=
host:9000&scheme=http`` reaches an S3-compatible server — and :meth:`Storage.location` hands them on to
the folders below it; messages show it without credentials and options (:attr:`Storage.uri`).

Models are read locally: :func:`jointray.artifacts.local_model` copies a model folder at a URI into a
per-node cache under :func:`cache_root`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

#: Where local copies of remote folders go (models, a search's driver files); ``JOINTRAY_CACHE`` moves it.
CACHE_ENV = "JOINTRAY_CACHE"


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def redact(location: str | os.PathLike) -> str:
    """``location`` fit for a message or a report: a URI without its credentials and options."""
    if not is_uri(location):
        return str(location)
    parts = urlsplit(str(location))
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}".rstrip("/")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jointray")


@dataclass
class Storage:
    """A pyarrow filesystem and a folder's path on it (local or remote alike).

    ``base``: the folder on ``fs``; ``uri``: the folder as the user can read it in a message (a Path's
    text when local; a URI without credentials or options when remote); ``local``: on this machine's
    filesystem.
    """

    fs: pafs.FileSystem
    base: str
    uri: str
    local: bool
    given: str  # the location as given, options included

    @classmethod
    def of(cls, location: str | os.PathLike) -> Storage:
        location = str(location)
        if not is_uri(location):
            base = str(Path(location).resolve())
            return cls(pafs.LocalFileSystem(), base, base, True, base)
        fs, base = pafs.FileSystem.from_uri(location)
        return cls(fs, base.rstrip("/"), redact(location), isinstance(fs, pafs.LocalFileSystem), location)

    def path(self, *parts: str) -> str:
        """A path under the folder on :attr:`fs`."""
        return "/".join([self.base, *parts])

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def where(self, *parts: str) -> Path | str:
        """A path under the folder as the user can use it in a message: a Path when local, else a URI."""
        return Path(self.base, *parts) if self.local else "/".join([self.uri, *parts])

    def location(self, *parts: str) -> str:
        """A folder under this one as a location :meth:`of` opens again: a local path, or the URI with its
        credentials and options (a trial's ``train.storage_path`` under a search's)."""
        if self.local:
            return str(Path(self.base, *parts))
        scheme, netloc, path, query, fragment = urlsplit(self.given)
        return urlunsplit((scheme, netloc, "/".join([path.rstrip("/"), *parts]), query, fragment))

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, path: str, text: str) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(text.encode())

    def upload(self, local: Path, path: str) -> None:
        """Copy the local file or folder ``local`` to ``path`` on :attr:`fs` (a folder: recursively)."""
        pafs.copy_files(str(local), path, destination_filesystem=self.fs)

    def download(self, path: str, local: Path) -> None:
        """Copy the file or folder ``path`` on :attr:`fs` to ``local`` (a folder: recursively)."""
        folder = self.fs.get_file_info(path).type == pafs.FileType.Directory
        (local if folder else local.parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=self.fs)


def mirror_folder(location: str | os.PathLike) -> Path:
    """The local working copy of a folder at a URI (a search's driver files): under :func:`cache_root`,
    keyed by the location without credentials, created empty if new."""
    storage = Storage.of(location)
    folder = cache_root() / "mirrors" / hashlib.sha256(storage.uri.encode()).hexdigest()[:20]
    folder.mkdir(parents=True, exist_ok=True)
    return folder

