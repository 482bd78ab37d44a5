"""Hostile archives: link chains, links already in the destination, repeated members, header bombs.

`safe_extract` must not depend on tarfile's PEP 706 filters, so the tests
that matter run with them made unavailable (`no_tar_filters`), as on a
Python that ``requires-python`` admits but that predates them.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
from hostile_inputs import bounded_memory, tar_with_header, write_tar, write_zip, zip_declaring

from localssl.data import DatasetError, UnsafeArchiveError, load_dataset, safe_extract


@pytest.fixture(params=["with-filters", "without-filters"])
def tar_filters(request, monkeypatch):
    """Run once as today, once as on a Python without ``tarfile.data_filter`` (extraction fully trusted)."""
    if request.param == "without-filters":
        for name in ("data_filter", "tar_filter", "fully_trusted_filter"):
            monkeypatch.delattr(tarfile, name, raising=False)
        # What extractall() does on such a Python: no filter at all.
        monkeypatch.setattr(tarfile.TarFile, "extraction_filter", staticmethod(lambda member, path: member),
                            raising=False)  # fmt: skip
    return request.param


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def test_safe_extract_refuses_the_link_chain_of_the_issue(tmp_path, tar_filters):
    # root/x -> . makes root/x/x/x == root, so root/x/x/x/y -> ../../.. is three folders above root,
    # and f.png lands outside dest, though every name and link target looks inside.
    root = tarfile.TarInfo("root")
    root.type = tarfile.DIRTYPE
    tar = _tar(tmp_path / "chain.tar", [
        (root, None),
        (_link("root/x", "."), None),
        (_link("root/x/x/x/y", "../../.."), None),
        (tarfile.TarInfo("root/x/x/x/y/f.png"), b"escaped"),
    ])  # fmt: skip
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafeArchiveError, match=r"chain\.tar.*root/x.*link"):
        safe_extract(tar, dest)
    assert not [p for p in tmp_path.rglob("f.png")], "a member was written"
    assert _files_under(dest) == set()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_safe_extract_never_writes_through_a_link_already_in_dest(tmp_path, tar_filters, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    members = [("sub/f.bin", b"x")]
    archive = write_zip(tmp_path / "a.zip", members) if kind == "zip" else write_tar(tmp_path / "a.tar", members)
    with pytest.raises(UnsafeArchiveError, match=rf"a\.{kind}.*symlink in the destination"):
        safe_extract(archive, dest)
    assert _files_under(outside) == set()


@pytest.mark.parametrize("hard", [False, True], ids=["symlink", "hardlink"])
def test_safe_extract_refuses_any_link_before_writing(tmp_path, tar_filters, hard):
    tar = _tar(tmp_path / "l.tar", [(tarfile.TarInfo("a.bin"), b"data"), (_link("b.bin", "a.bin", hard), None)])
    with pytest.raises(UnsafeArchiveError, match=r"l\.tar.*'b\.bin' is a link"):
        safe_extract(tar, tmp_path / "dest")
    assert _files_under(tmp_path / "dest") == set()  # checked before the first write


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_safe_extract_refuses_a_member_twice_and_a_total_over_max_bytes(tmp_path, kind):
    def make(path, members):
        return write_zip(path.with_suffix(".zip"), members) if kind == "zip" else write_tar(path, members)

    twice = make(tmp_path / "twice.tar", [("a.bin", b"1"), ("a.bin", b"2")])
    with pytest.raises(UnsafeArchiveError, match=r"twice\.(tar|zip).*'a\.bin' appears more than once"):
        safe_extract(twice, tmp_path / "d1")
    big = make(tmp_path / "big.tar", [("a.bin", b"x" * 600), ("b.bin", b"y" * 600)])
    with pytest.raises(DatasetError, match=r"big\.(tar|zip).*1,200 bytes.*1,000"):
        safe_extract(big, tmp_path / "d2", max_bytes=1000)
    assert _files_under(tmp_path / "d2") == set()
    out = safe_extract(big, tmp_path / "d3", max_bytes=1200)
    assert (out / "b.bin").read_bytes() == b"y" * 600


def test_safe_extract_zip_member_holding_more_than_declared_is_an_error(tmp_path):
    z = zip_declaring(write_zip(tmp_path / "z.zip", [("a.bin", b"x" * 5000)]), "a.bin", 100)
    with pytest.raises(DatasetError, match=r"z\.zip.*a\.bin"):
        safe_extract(z, tmp_path / "dest")


@pytest.mark.parametrize("kind", [b"L", b"x"], ids=["gnu-longname", "pax"])
def test_tar_extension_header_declaring_gigabytes_is_refused_before_reading(tmp_path, kind):
    tar = tar_with_header(tmp_path / "h.tar.gz", kind, 1 << 30)
    match = r"h\.tar\.gz.*long-name/pax header.*1,073,741,824"
    with bounded_memory(32), pytest.raises(UnsafeArchiveError, match=match):
        load_dataset("imagefolder", tar, "all")


def test_zip_symlink_member_declaring_a_huge_target_is_refused_before_reading(tmp_path):
    z = tmp_path / "l.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("a/link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "b")
    zip_declaring(z, "a/link", 400_000_000)
    with bounded_memory(16), pytest.raises(DatasetError, match=r"l\.zip.*a/link.*more than a symlink target"):
        load_dataset("imagefolder", z, "all")


def test_safe_extract_still_extracts_plain_archives(tmp_path, tar_filters):
    files = [("top/a/1.bin", b"one"), ("top/b/2.bin", b"two" * 1000)]
    for archive in (write_tar(tmp_path / "ok.tar.gz", files), write_zip(tmp_path / "ok.zip", files)):
        dest = tmp_path / re.sub(r"\W", "_", archive.name)
        safe_extract(archive, dest)
        assert (dest / "top/b/2.bin").read_bytes() == b"two" * 1000
        assert _files_under(dest) == {"top", "top/a", "top/b", "top/a/1.bin", "top/b/2.bin"}
