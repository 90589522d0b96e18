"""Output files that appear whole or not at all, and manifests that vouch for them.

A tool writes every output under a temporary name inside :class:`StagedOutputs`; only when
the tool finishes are they renamed onto their final names (each rename is atomic), the
manifest last. If the tool fails -- an error, Ctrl-C, or SIGTERM, which is turned into an exit
while staging -- the temporary files are deleted and whatever was at the final names before is
untouched. Temporary names are :mod:`megatron_rpo.publish`'s (host and process id), so what a
``kill -9`` left behind is removed by the next run on that prefix from the same host.
The manifest records each file's size and sha256, so a reader (:func:`read_manifest`) also
notices files from two different runs.
"""

from __future__ import annotations

import json
import os
import signal

from megatron_rpo.data.tokenizer import file_sha256
from megatron_rpo.errors import InputError
from megatron_rpo.publish import remove_stale, staging_tag

__all__ = ["StagedOutputs", "read_manifest", "manifest_path", "verify_files"]


def manifest_path(prefix: str) -> str:
    return f"{prefix}.manifest.json"


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through StagedOutputs.__exit__, which deletes the staged files


class StagedOutputs:
    """Context manager: ``staged.path(final)`` gives a temporary path; all are committed on success."""

    def __init__(self) -> None:
        self._tag = staging_tag()
        self._staged: dict[str, str] = {}
        self._previous_handler = None

    def path(self, final: str) -> str:
        """The temporary path to write ``final`` to.

        Raises:
            ValueError: the file cannot be created there (read-only file system, a parent that is
                a file, no permission), naming the path.
        """
        folder = os.path.dirname(os.path.abspath(final))
        tmp = final + self._tag
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise InputError(f"cannot write {final}: {existing} is a file, not a directory")
        try:
            os.makedirs(folder, exist_ok=True)
            remove_stale(final)
            open(tmp, "wb").close()  # fail here, before any work, if it cannot be written
        except OSError as e:
            raise InputError(f"cannot write {final}: {e.strerror or e}") from None
        self._staged[final] = tmp
        return tmp

    def describe(self, final: str) -> dict:
        """Size and sha256 of a staged file, for the manifest."""
        tmp = self._staged[final]
        return {"name": os.path.basename(final), "size": os.path.getsize(tmp), "sha256": file_sha256(tmp)}

    def write_manifest(self, prefix: str, manifest: dict) -> str:
        """Stage the manifest (committed after every other file)."""
        final = manifest_path(prefix)
        with open(self.path(final), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        return final

    def __enter__(self) -> "StagedOutputs":
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except ValueError:  # not the main thread: SIGTERM keeps its handler
            self._previous_handler = None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        if exc_type is not None:
            for tmp in self._staged.values():
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        manifests = [f for f in self._staged if f.endswith(".manifest.json")]
        for final in [f for f in self._staged if f not in manifests] + manifests:
            os.replace(self._staged[final], final)


def verify_files(prefix: str, manifest: dict) -> None:
    """Raise ValueError unless every file the manifest lists exists with its recorded size and hash."""
    folder = os.path.dirname(os.path.abspath(prefix))
    for entry in manifest.get("files", []):
        path = os.path.join(folder, entry["name"])
        if not os.path.exists(path):
            raise InputError(f"{manifest_path(prefix)}: listed file {path} is missing")
        if os.path.getsize(path) != entry["size"] or file_sha256(path) != entry["sha256"]:
            raise InputError(
                f"{path} does not match {manifest_path(prefix)} (size or sha256 differs): "
                "it was written by another run; rerun the tool"
            )


def read_manifest(prefix: str, kind: str, verify: bool = True) -> dict:
    """Load ``PREFIX.manifest.json``, check its kind and (optionally) its files.

    Raises:
        ValueError: missing or unreadable manifest, another kind of dataset, or files that do
            not match it.
    """
    path = manifest_path(prefix)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path} not found: is {prefix!r} the prefix of a dataset written by our tools?") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("kind") != kind:
        raise InputError(f"{path}: expected a {kind!r} manifest, got kind {manifest.get('kind')!r}")
    if verify:
        verify_files(prefix, manifest)
    return manifest
