"""A sweep's own files (trial rows, report, W&B offline runs), kept with the experiment wherever it is stored.

Ray keeps its state and the Train runs at `<distributed.storage_path>/<name>`; msad's files go to the same place, so
they outlive the process that ran the sweep (under `ray job submit --working-dir` or a KubeRay RayJob, the driver's
working directory is deleted with the job). A path location (local disk, NFS) is written directly. An object-store
location (`s3://...`) cannot be appended to, so the driver writes a local copy, `./runs/<name>` of the process that
runs the sweep, and uploads each file once it is complete; `pull` rebuilds the copy in another process (a resumed
sweep, `launch.py report s3://...`). An upload that fails (an object-store outage) is retried with the next one and
at the end, and the local copy is kept either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from msad import console, storage

LOCAL_ROOT = "runs"  # the local copy of an object-store experiment: ./runs/<name> of the driver process


class ExperimentFiles:
    """The experiment's files at `location`, with a local folder to write them in first.

    Args:
        location: the experiment location, `<distributed.storage_path>/<name>`: a path or an object-store URI.
    """

    def __init__(self, location: str) -> None:
        self.location = storage.resolve(location)
        self._pending: set[str] = set()
        self._local: Path | None = None
        self._failing = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment: a resumed sweep runs in another process and directory
        return {"location": self.location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["location"])

    @property
    def name(self) -> str:
        return self.location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def remote(self) -> bool:
        return storage.is_uri(self.location)

    @property
    def local(self) -> Path:
        """The folder to write in: the experiment itself for a path, else ./runs/<name> of this process."""
        if self._local is None:
            self._local = Path(LOCAL_ROOT).resolve() / self.name if self.remote else Path(self.location)
        return self._local

    def upload(self, *relative: str) -> bool:
        """Copy files or folders (relative to the experiment) from the local copy to the location, with any earlier
        uploads that failed. Returns whether everything is uploaded; a failure is reported in one line, not raised:
        the sweep goes on, and the local copy stays.

        Args:
            relative: paths inside the experiment, e.g. "results/teacher-w0.25-h800.json" or "wandb/offline-run-x".
        """
        if not self.remote:
            return True
        self._pending.update(relative)
        for item in sorted(self._pending):
            source = self.local / item
            try:
                _copy(source, pafs.LocalFileSystem(), *storage.filesystem(storage.join(self.location, item)))
            except OSError as err:  # pyarrow raises OSError for object-store failures
                # one line per outage, not one per file, and none if another process already told of this outage
                storage.outage_met(f"uploading {item}", err, f"kept in {self.local}; uploaded with the next upload "
                                   "and at the end")
                self._failing = True
                return False
            self._pending.discard(item)
        if self._failing:
            storage.outage_over()
            console.current().event(f"the files that waited for the object store are in {self.location}")
            self._failing = False
        return True

    def pull(self, *relative: str) -> None:
        """Copy files or folders of the experiment into the local copy (nothing to do for a path location).

        Args:
            relative: paths inside the experiment; missing ones are skipped.
        """
        if not self.remote:
            return
        for item in relative:
            fs, path = storage.filesystem(storage.join(self.location, item))
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                _copy(path, fs, pafs.LocalFileSystem(), str(self.local / item))

    def describe(self) -> str:
        """Where the files are, for the last lines a sweep prints."""
        if not self.remote:
            return str(self.location)
        return f"{self.location} (local copy: {self.local})"


def _copy(source: Path | str, source_fs: pafs.FileSystem, target_fs: pafs.FileSystem, target: str) -> None:
    """Copy one file or a folder tree between filesystems."""
    folder = source_fs.get_file_info(str(source)).type == pafs.FileType.Directory
    if isinstance(target_fs, pafs.LocalFileSystem):  # pyarrow creates no local parent folders
        (Path(target) if folder else Path(target).parent).mkdir(parents=True, exist_ok=True)
    if folder:
        pafs.copy_files(str(source), target, source_filesystem=source_fs, destination_filesystem=target_fs)
        return
    with source_fs.open_input_stream(str(source)) as reader, target_fs.open_output_stream(target) as writer:
        writer.write(reader.read())
