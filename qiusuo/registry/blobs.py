"""Content-addressed blob store: one file per distinct content, named `sha256-<hex>`.

Like Ollama's `~/.ollama/models/blobs`, identical files (the same tokenizer.json in every
checkpoint of a run, a re-imported checkpoint) are stored once. A blob is written to a temporary
file in the same directory and renamed into place with `os.replace`, so a reader never sees a
half-written blob and two processes writing the same content both succeed (the rename is atomic
and both write identical bytes). Blobs are made read-only: `materialize` hands them out as hard
links, and an in-place write through a link would otherwise change the blob under every model
that shares it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "sha256-"
_CHUNK = 1 << 20
_STALE_TMP_S = 3600.0  # temporaries older than this belong to a crashed import


def hash_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, streamed (checkpoints can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class BlobStore:
    """The `blobs/` directory of a registry home."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / f"{PREFIX}{digest}"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def stage(self, src: str | os.PathLike) -> tuple[Path, str, int]:
        """Copy `src` to a temporary file in the store; returns (temporary, digest, size). Hashes
        while copying, so the digest is of the bytes actually stored even if `src` changes."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            size = 0
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, h.hexdigest(), size

    def commit(self, tmp: Path, digest: str) -> None:
        """Rename a staged temporary into place as blob `digest`. An existing blob is replaced
        too: same bytes if it is intact, and re-importing is then how a corrupt blob is healed."""
        os.chmod(tmp, 0o444)
        os.replace(tmp, self.path(digest))

    def check(self, digest: str) -> str | None:
        """None if the blob is present and hashes to its name, else what is wrong with it."""
        p = self.path(digest)
        if not p.is_file():
            return f"blob {p.name} is missing"
        actual = hash_file(p)
        if actual != digest:
            return f"blob {p.name} is corrupt (its content hashes to sha256:{actual[:12]}…)"
        return None

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def digests(self) -> set[str]:
        """Every stored blob's digest (temporaries excluded)."""
        if not self.root.is_dir():
            return set()
        return {p.name[len(PREFIX):] for p in self.root.iterdir() if p.name.startswith(PREFIX)}

    def remove_stale_temporaries(self) -> int:
        cutoff = time.time() - _STALE_TMP_S
        removed = 0
        for p in self.root.glob(".tmp-*"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another process cleaned it first
        return removed

    def link_or_copy(self, digest: str, dst: Path) -> None:
        """Place the blob at `dst`: a hard link (no extra disk), or a copy across filesystems."""
        try:
            os.link(self.path(digest), dst)
        except OSError:
            shutil.copyfile(self.path(digest), dst)
