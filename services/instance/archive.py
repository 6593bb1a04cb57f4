"""The export archive's format: one uncompressed tar, written and checked as a stream.

Why tar: its members follow one another, each with its size in a header before its bytes, so
it is written front to back with no directory to seek back to (zip keeps one at its end) and
read the same way; every system opens it (``tar xf``). It is not compressed: the Parquet files
are (zstd), the CSV files are there to be read by anything, and compressing both would cost the
instance's CPU at every export (compress it on your side if you keep it).

Layout (format ``iotistic-export``, version ``FORMAT_VERSION``):

- ``iotistic-export.json`` first: the format and its version, so an import refuses another
  archive before reading on;
- the data files (``devices.jsonl``, ``readings/<device>/<day>.csv`` and ``.parquet``, ...);
- ``manifest.json`` last: every file with its size, rows and sha256, the instance, the customer
  and the readings' time range. It comes last because the checksums are known only once the
  files are written.

Every file member's name is checked on reading (no absolute path, no ``..``, regular files
only): an archive is data the instance was sent, never paths it trusts.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

FORMAT = "iotistic-export"
FORMAT_VERSION = 1
HEADER_NAME = "iotistic-export.json"
MANIFEST_NAME = "manifest.json"
BLOCK = 512
# Two files per device and day: 500 devices for five years, and room to spare.
MAX_FILES = 2_000_000
# Members bigger than this are not read into memory whole when an import checks them.
READ_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MEMBER = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,3}$")


class ArchiveRefused(ValueError):
    """An archive that is not one this instance restores, and why; ``file`` names the part."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


def safe_part(value: str) -> str:
    """``value`` as one part of a member's name: itself when it is plain, else its hash (the
    manifest keeps the value)."""
    if _SAFE_NAME.match(value) and value not in {".", ".."}:
        return value
    return "x-" + hashlib.sha256(value.encode()).hexdigest()[:32]


def member_header(name: str, size: int, mtime: float) -> bytes:
    """The tar header of a regular file (PAX, so sizes and names have no small limits)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def padding(size: int) -> bytes:
    """The zero bytes that fill a member's data to a whole block."""
    return b"\0" * (-size % BLOCK)


END = b"\0" * (2 * BLOCK)


@dataclass
class FileEntry:
    """One file of the archive as the manifest lists it."""

    name: str
    kind: str
    sha256: str
    bytes: int
    rows: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The manifest's entry."""
        entry: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "sha256": self.sha256,
            "bytes": self.bytes,
        }
        if self.rows is not None:
            entry["rows"] = self.rows
        return entry | self.extra


def header_file() -> bytes:
    """The first member's content."""
    return json.dumps({"format": FORMAT, "version": FORMAT_VERSION}).encode() + b"\n"


# --- reading ---------------------------------------------------------------------------------


def _check_header(archive: tarfile.TarFile, first: tarfile.TarInfo) -> None:
    if first.name != HEADER_NAME or not first.isfile() or first.size > 4096:
        raise ArchiveRefused(
            first.name, f"not an {FORMAT} archive (its first file is not {HEADER_NAME})"
        )
    body = archive.extractfile(first)
    try:
        header = json.loads(body.read() if body else b"")
    except ValueError:
        raise ArchiveRefused(HEADER_NAME, "is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArchiveRefused(HEADER_NAME, f"not an {FORMAT} archive")
    if header.get("version") != FORMAT_VERSION:
        raise ArchiveRefused(
            HEADER_NAME,
            f"format version {header.get('version')!r}; this instance restores version "
            f"{FORMAT_VERSION}",
        )


def _digest(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(READ_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _manifest(archive: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    if member.size > 256 << 20:
        raise ArchiveRefused(MANIFEST_NAME, "is larger than 256 MiB")
    body = archive.extractfile(member)
    try:
        manifest = json.loads(body.read() if body else b"")
    except ValueError:
        raise ArchiveRefused(MANIFEST_NAME, "is not JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ArchiveRefused(MANIFEST_NAME, "has no list of files")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ArchiveRefused(MANIFEST_NAME, f"is not an {FORMAT} version {FORMAT_VERSION} manifest")
    return manifest


def _listed(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listed: dict[str, dict[str, Any]] = {}
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ArchiveRefused(MANIFEST_NAME, "lists a file without a name")
        name = entry["name"]
        if not _MEMBER.match(name) or ".." in name.split("/"):
            raise ArchiveRefused(MANIFEST_NAME, f"lists a file with a name not allowed: {name!r}")
        if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("kind"), str):
            raise ArchiveRefused(name, "has no sha256 or kind in the manifest")
        if name in listed:
            raise ArchiveRefused(name, "is listed twice in the manifest")
        listed[name] = entry
    return listed


@dataclass
class CheckedArchive:
    """An archive whose every file matched the manifest: the manifest, and each file's
    entry by name (open them with ``open``)."""

    path: str
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]]
    _members: dict[str, tarfile.TarInfo]

    def open(self, archive: tarfile.TarFile, name: str) -> IO[bytes]:
        """The content of file ``name`` (checked already) from ``archive`` (open on ``path``)."""
        stream = archive.extractfile(self._members[name])
        if stream is None:
            raise ArchiveRefused(name, "is not a regular file")
        return stream

    def of_kind(self, kind: str) -> Iterator[dict[str, Any]]:
        """The entries of one kind, in the manifest's order."""
        return (e for e in self.files.values() if e["kind"] == kind)


def _members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's members, at most ``MAX_FILES`` of them (each is kept while it is read)."""
    members: list[tarfile.TarInfo] = []
    try:
        while (member := archive.next()) is not None:
            members.append(member)
            if len(members) > MAX_FILES:
                raise ArchiveRefused("archive", f"has more than {MAX_FILES} files")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveRefused("archive", f"is cut short or damaged ({exc})") from None
    return members


def check_archive(path: str) -> CheckedArchive:
    """Read the archive at ``path`` through: its header first, then every member, each hashed
    and compared with the manifest (found last); ``ArchiveRefused`` names the first file that
    is missing, extra, not a regular file or whose checksum or size differs."""
    try:
        archive = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveRefused("archive", f"is not a tar archive ({exc})") from None
    with archive:
        members = _members(archive)
        if not members:
            raise ArchiveRefused("archive", "is empty")
        _check_header(archive, members[0])
        by_name: dict[str, tarfile.TarInfo] = {}
        for member in members[1:]:
            if not member.isfile():
                raise ArchiveRefused(member.name, "is not a regular file")
            if member.name in by_name or member.name == HEADER_NAME:
                raise ArchiveRefused(member.name, "is in the archive twice")
            by_name[member.name] = member
        if MANIFEST_NAME not in by_name:
            raise ArchiveRefused(MANIFEST_NAME, "is missing (the archive may be cut short)")
        manifest = _manifest(archive, by_name.pop(MANIFEST_NAME))
        listed = _listed(manifest)
        for name in by_name:
            if name not in listed:
                raise ArchiveRefused(name, "is not listed in the manifest")
        for name, entry in listed.items():
            found = by_name.get(name)
            if found is None:
                raise ArchiveRefused(name, "is listed in the manifest and missing")
            member = found
            if member.size != entry.get("bytes"):
                said = entry.get("bytes")
                raise ArchiveRefused(name, f"has {member.size} bytes; the manifest says {said}")
            stream = archive.extractfile(member)
            if stream is None or _digest(stream) != entry["sha256"]:
                raise ArchiveRefused(name, "its sha256 does not match the manifest")
        return CheckedArchive(path, manifest, listed, by_name)


def tar_bytes(members: list[tuple[str, bytes]], mtime: float = 0) -> bytes:
    """A whole archive of small members, in order (for tests and tools)."""
    out = io.BytesIO()
    for name, data in members:
        out.write(member_header(name, len(data), mtime) + data + padding(len(data)))
    out.write(END)
    return out.getvalue()
