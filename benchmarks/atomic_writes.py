"""What writing Ray's files whole costs: a checkpoint folder uploaded the way Ray Train uploads it
(`_upload_to_fs_path`), to a local path through pyarrow's plain local filesystem and through msad's
(`storage.ray_storage`: temp file, fsync, rename), side by side, alternating, median of `--repeats`.

    python benchmarks/atomic_writes.py --megabytes 100 --repeats 5 --dir /path/on/the/storage/disk
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
from ray.train._internal.storage import _upload_to_fs_path

from msad import storage


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=100, help="checkpoint size (a width-1.0 FCOS is ~130 MB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        source = root / "local" / "checkpoint_0000001"
        source.mkdir(parents=True)
        (source / "checkpoint.pt").write_bytes(os.urandom(args.megabytes << 20))
        (source / "checkpoint.pt.sha256").write_text("0" * 64 + "\n")
        systems = {"plain": pafs.LocalFileSystem(), "msad": storage.ray_storage(str(root))[1]}
        seconds: dict[str, list[float]] = {name: [] for name in systems}
        for repeat in range(args.repeats):
            for name, fs in systems.items():
                target = root / "store" / f"{name}-{repeat}"
                start = time.perf_counter()
                _upload_to_fs_path(str(source), fs, str(target))
                seconds[name].append(time.perf_counter() - start)
                shutil.rmtree(target)
    finally:
        shutil.rmtree(root)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    print(f"{args.megabytes} MB checkpoint upload, median of {args.repeats}: plain {medians['plain']:.3f} s, "
          f"msad (whole files) {medians['msad']:.3f} s, ratio {medians['msad'] / medians['plain']:.2f}x")
    return medians


if __name__ == "__main__":
    main()
