"""Clusters at runtime: object storage through a real S3 server on localhost (moto's, installed from PyPI, started
by the `s3_bucket` fixture on 127.0.0.1). A sweep submitted with `ray job submit` to a two-node Ray started with
`ray start`, storing in S3, with a node lost mid-run, is in tests/test_node_loss.py: there a student reads its
teacher's checkpoint from S3 (digest checked) and writes its own there.
"""

from __future__ import annotations

from msad import storage


def test_storage_round_trip_on_s3(s3_bucket: str) -> None:
    location = storage.join(s3_bucket, "a", "b.bin")
    storage.write_bytes(location, b"\x00msad")
    assert storage.exists(location) and storage.read_bytes(location) == b"\x00msad"
    assert storage.local_copy(location).read_bytes() == b"\x00msad"
    assert not storage.exists(storage.join(s3_bucket, "a", "missing.bin"))


def test_a_file_with_a_digest_is_downloaded_once_per_node(s3_bucket: str, tmp_path) -> None:
    """A student's driver and each of its workers on one node read the teacher: the cached copy is used again while
    the stored digest sidecar is unchanged, and fetched again when the file changes."""
    location = storage.join(s3_bucket, "teacher", "teacher_sliced.pt")
    storage.write_bytes(location, b"weights v1")
    storage.write_bytes(location.replace("teacher_sliced.pt", "teacher_sliced.pt.sha256", 1), b"digest v1")
    first = storage.local_copy(location, cache_dir=tmp_path, sidecars=(".sha256",))
    first.write_bytes(b"cached")  # marks the cached copy: a second download would overwrite it
    assert storage.local_copy(location, cache_dir=tmp_path, sidecars=(".sha256",)).read_bytes() == b"cached"
    storage.write_bytes(location, b"weights v2")
    storage.write_bytes(location.replace("teacher_sliced.pt", "teacher_sliced.pt.sha256", 1), b"digest v2")
    again = storage.local_copy(location, cache_dir=tmp_path, sidecars=(".sha256",))
    assert again == first and again.read_bytes() == b"weights v2"
    assert storage.sibling(location, "x.json") == storage.join(s3_bucket, "teacher", "x.json")  # ?query kept
