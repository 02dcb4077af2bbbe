"""Clusters at runtime: object storage through a real S3 server on localhost (moto's, installed from PyPI, started
by the `s3_bucket` fixture on 127.0.0.1). A sweep submitted with `ray job submit` to a two-node Ray started with
`ray start`, storing in S3, with a node lost mid-run, is in tests/test_node_loss.py: there a student reads its
teacher's checkpoint from S3 (digest checked) and writes its own there.
"""

from __future__ import annotations

from msad.engine import storage


def test_storage_round_trip_on_s3(s3_bucket: str) -> None:
    location = storage.join(s3_bucket, "a", "b.bin")
    storage.write_bytes(location, b"\x00msad")
    assert storage.exists(location) and storage.read_bytes(location) == b"\x00msad"
    assert storage.local_copy(location).read_bytes() == b"\x00msad"
    assert not storage.exists(storage.join(s3_bucket, "a", "missing.bin"))
