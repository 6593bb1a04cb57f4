"""The export archive's parts that need no server: the customer-events answer told whole from
cut short, member names kept inside the archive, and links refused."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
from export_steps import retar

from services.instance.archive import (
    MANIFEST_NAME,
    ArchiveRefused,
    check_archive,
    header_file,
    safe_part,
)
from services.instance.customer_events import EventsUnavailable, _whole

EVENT = b'{"seq": 1, "subject": "x.CustomerSignedUp.k", "event": {"type": "CustomerSignedUp"}}\n'


def test_a_whole_answer_gives_its_events_and_one_cut_short_is_refused() -> None:
    whole = _whole(io.BytesIO(EVENT * 2 + b'{"end": {"events": 2, "through_seq": 9}}\n'))
    whole.body.seek(0)
    assert whole.rows == 2 and whole.body.read() == EVENT * 2
    for answer in (
        EVENT * 2,  # no end: the control plane stopped midway
        EVENT + b'{"end": {"events": 2, "through_seq": 9}}\n',  # fewer than it says
        b'{"end": {"events": 0, "through_seq": 9}}\n' + EVENT,  # something after the end
    ):
        with pytest.raises(EventsUnavailable):
            _whole(io.BytesIO(answer))


def test_a_device_id_that_is_no_plain_name_becomes_a_hash() -> None:
    assert safe_part("a1b2c3") == "a1b2c3"
    for odd in ("../x", "..", "a/b", "x" * 65, "naïve", ""):
        part = safe_part(odd)
        assert part.startswith("x-") and "/" not in part and ".." not in part


def _checked(parts: dict[str, bytes], link: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.tar"
        data = retar(parts)
        if link is not None:
            out = io.BytesIO()
            with tarfile.open(fileobj=out, mode="w:") as tar:
                for name, body in parts.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
                info = tarfile.TarInfo(link)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            data = out.getvalue()
        path.write_bytes(data)
        check_archive(str(path))


def test_links_and_names_outside_the_archive_are_refused() -> None:
    manifest = {"format": "iotistic-export", "version": 1, "files": []}
    parts = {"iotistic-export.json": header_file(), MANIFEST_NAME: json.dumps(manifest).encode()}
    _checked(parts)  # empty, but whole
    with pytest.raises(ArchiveRefused) as refused:
        _checked(parts, link="devices.jsonl")
    assert refused.value.file == "devices.jsonl" and "regular" in refused.value.reason
    listed = {**manifest, "files": [{"name": "../etc/x", "kind": "x", "sha256": "0", "bytes": 0}]}
    with pytest.raises(ArchiveRefused) as refused:
        _checked({**parts, MANIFEST_NAME: json.dumps(listed).encode()})
    assert refused.value.file == MANIFEST_NAME and "not allowed" in refused.value.reason
