"""`Registry`: import, list, show, tag, remove, verify and materialize checkpoints by name.

Ollama's habits: models are `NAME[:TAG]` with tag `latest` by default; `tag` copies a reference,
never bytes; removing a model deletes the blobs no other model uses. Layout under `QIUSUO_HOME`
(default `~/.qiusuo`):

    registry.db                  SQLite index (models, files, pending imports)
    blobs/sha256-<hex>           one file per distinct content, read-only
    models/<name>@<tag>/         a materialized checkpoint: hard links to (or copies of) blobs

`@` cannot occur in a name, so `a/b@latest` and `a@b` never share a directory (`<name>/<tag>`
would put model `a:b` and model `a/b` in the same place).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import index
from .blobs import BlobStore, hash_file
from .checkpoint_info import inspect_checkpoint

DEFAULT_TAG = "latest"
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_TAG = re.compile(_SEGMENT)
_MAX_NAME = 200
_MAX_TAG = 128


class RegistryError(ValueError):
    """A user-facing registry error (the CLI prints it on one line and exits 2)."""


class UnknownModelError(RegistryError):
    pass


class CorruptBlobError(RegistryError):
    pass


def parse_name(ref: str) -> tuple[str, str]:
    """`NAME[:TAG]` -> (name, tag); ValueError stating the rule for anything else."""
    name, sep, tag = ref.partition(":")
    tag = tag if sep else DEFAULT_TAG
    rule = ("use NAME[:TAG] where NAME is letters, digits and . _ - in '/'-separated parts, each "
            "starting with a letter or digit, and TAG is letters, digits and . _ - (e.g. tiny-moe:grpo-v1)")
    if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
        raise RegistryError(f"invalid model name {ref!r}: {rule}")
    if not _TAG.fullmatch(tag) or len(tag) > _MAX_TAG:
        raise RegistryError(f"invalid tag in {ref!r}: {rule}")
    return name, tag


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint directory, '/'-separated
    digest: str  # sha256 hex = blob name without the `sha256-` prefix
    size: int


@dataclass
class ModelInfo:
    name: str
    tag: str
    created: float  # unix time
    architecture: str | None
    model_type: str | None
    parameters: int | None
    size: int
    source_run: str | None
    eval_score: float | None
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


def default_home() -> Path:
    return Path(os.environ.get("QIUSUO_HOME") or "~/.qiusuo").expanduser()


def _checkpoint_files(path: Path) -> list[tuple[str, Path]]:
    """(relative '/'-path, file) for every file under `path`; hidden files and folders skipped
    (editor swap files, `.git`, save_model's temporaries). Symlinked files are followed, so an
    HF-cache snapshot (symlinks into its own blob store) imports its content."""
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    return out


class Registry:
    """The model store under `home` (default: $QIUSUO_HOME or ~/.qiusuo). Safe to use from
    several processes at once; nothing is created on disk until the first import."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.db_path = self.home / "registry.db"
        self.blobs = BlobStore(self.home / "blobs")
        self.models_dir = self.home / "models"

    # ------------------------------------------------------------------ reading
    def _connect(self):
        self.home.mkdir(parents=True, exist_ok=True)
        return index.opened(self.db_path)

    def list(self) -> list[ModelInfo]:
        if not self.db_path.exists():
            return []
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM models ORDER BY name, tag").fetchall()
            return [self._info(conn, row) for row in rows]

    def show(self, ref: str) -> ModelInfo:
        name, tag = parse_name(ref)
        if self.db_path.exists():
            with self._connect() as conn:
                row = conn.execute("SELECT * FROM models WHERE name = ? AND tag = ?", (name, tag)).fetchone()
                if row is not None:
                    return self._info(conn, row)
        raise self._unknown(f"{name}:{tag}")

    def _info(self, conn, row) -> ModelInfo:
        files = [FileEntry(r["path"], r["digest"], r["size"]) for r in
                 conn.execute("SELECT path, digest, size FROM files WHERE model_id = ? ORDER BY path", (row["id"],))]
        return ModelInfo(
            name=row["name"], tag=row["tag"], created=row["created"], architecture=row["architecture"],
            model_type=row["model_type"], parameters=row["parameters"], size=row["size"],
            source_run=row["source_run"], eval_score=row["eval_score"], metadata=json.loads(row["metadata"]),
            files=files,
        )

    def _unknown(self, ref: str) -> UnknownModelError:
        return UnknownModelError(f"no model {ref!r}: {self.known_models_hint()}")

    def known_models_hint(self) -> str:
        """'known: a:latest, b:v1 (registry at HOME)', or how to fill an empty registry."""
        known = [m.ref for m in self.list()]
        if not known:
            return (f"the registry at {self.home} is empty; add a checkpoint with "
                    "`qiusuo models import DIR --name NAME[:TAG]`")
        return f"known: {', '.join(known)} (registry at {self.home})"

    # ------------------------------------------------------------------ writing
    def import_dir(self, path: str | os.PathLike, name: str, *, source_run: str | None = None,
                   eval_score: float | None = None, metadata: dict[str, Any] | None = None) -> ModelInfo:
        """Copy the checkpoint directory `path` into the store as `name` (NAME[:TAG]); an existing
        NAME:TAG is replaced atomically and the blobs only it used are deleted.

        source_run / eval_score default to qiusuo.json's `run_dir` / `eval`; `metadata` is merged
        over qiusuo.json's content."""
        name, tag = parse_name(name)
        path = Path(path)
        info = inspect_checkpoint(path)
        files = _checkpoint_files(path)
        meta = {**info["metadata"], **(metadata or {})}
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise RegistryError(f"metadata for {name}:{tag} is not JSON-serializable ({e})") from None
        token = uuid.uuid4().hex
        staged: list[tuple[str, Path, str, int]] = []  # (rel path, temporary, digest, size)
        digests: set[str] = set()
        try:
            for rel, p in files:
                tmp, digest, size = self.blobs.stage(p)
                staged.append((rel, tmp, digest, size))
                digests.add(digest)
            with self._connect() as conn:
                # Announce the digests before they become blobs, so a concurrent remove's garbage
                # collection cannot delete one between our rename and our commit (see index.py).
                index.add_pending(conn, token, sorted(digests))
                for _, tmp, digest, _ in staged:
                    self.blobs.commit(tmp, digest)
                with index.transaction(conn):
                    released = self._delete_row(conn, name, tag)
                    cur = conn.execute(
                        "INSERT INTO models (name, tag, created, architecture, model_type, parameters, size,"
                        " source_run, eval_score, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, tag, time.time(), info["architecture"], info["model_type"], info["parameters"],
                         sum(s for *_, s in staged),
                         source_run if source_run is not None else info["source_run"],
                         eval_score if eval_score is not None else info["eval_score"], meta_json))
                    conn.executemany("INSERT INTO files (model_id, path, digest, size) VALUES (?, ?, ?, ?)",
                                     [(cur.lastrowid, rel, d, s) for rel, _, d, s in staged])
                    index.drop_pending(conn, token)
                self._collect(conn, released)
        except BaseException:
            for _, tmp, _, _ in staged:
                tmp.unlink(missing_ok=True)
            if self.db_path.exists():
                with self._connect() as conn:
                    with index.transaction(conn):
                        index.drop_pending(conn, token)
                    self._collect(conn, digests)
            raise
        self._drop_materialized(name, tag)
        return self.show(f"{name}:{tag}")

    def tag(self, src: str, dst: str) -> ModelInfo:
        """Make `dst` another name for `src`'s files (a reference copy; no blob is written)."""
        src_info = self.show(src)
        name, tag = parse_name(dst)
        if (name, tag) == (src_info.name, src_info.tag):
            return src_info
        with self._connect() as conn:
            with index.transaction(conn):
                row = conn.execute("SELECT id FROM models WHERE name = ? AND tag = ?",
                                   (src_info.name, src_info.tag)).fetchone()
                if row is None:
                    raise self._unknown(src_info.ref)  # removed since show()
                released = self._delete_row(conn, name, tag)
                cur = conn.execute(
                    "INSERT INTO models (name, tag, created, architecture, model_type, parameters, size, source_run,"
                    " eval_score, metadata) SELECT ?, ?, ?, architecture, model_type, parameters, size, source_run,"
                    " eval_score, metadata FROM models WHERE id = ?", (name, tag, time.time(), row["id"]))
                conn.execute("INSERT INTO files (model_id, path, digest, size) SELECT ?, path, digest, size"
                             " FROM files WHERE model_id = ?", (cur.lastrowid, row["id"]))
            self._collect(conn, released)
        self._drop_materialized(name, tag)
        return self.show(f"{name}:{tag}")

    def remove(self, ref: str) -> None:
        """Delete NAME[:TAG] and every blob no other model uses."""
        name, tag = parse_name(ref)
        if not self.db_path.exists():
            raise self._unknown(f"{name}:{tag}")
        with self._connect() as conn:
            with index.transaction(conn):
                released = self._delete_row(conn, name, tag)
            if released is None:
                raise self._unknown(f"{name}:{tag}")
            self._collect(conn, released)
        self._drop_materialized(name, tag)

    def set_eval_score(self, ref: str, score: float | None) -> ModelInfo:
        name, tag = parse_name(ref)
        self.show(ref)  # the unknown-name error
        with self._connect() as conn:
            with index.transaction(conn):
                conn.execute("UPDATE models SET eval_score = ? WHERE name = ? AND tag = ?",
                             (None if score is None else float(score), name, tag))
        return self.show(ref)

    def gc(self) -> int:
        """Delete every blob no model or live import refers to; returns how many."""
        if not self.db_path.exists():
            return 0
        self.blobs.remove_stale_temporaries()
        with self._connect() as conn:
            with index.transaction(conn):
                index.drop_dead_pending(conn)
            return self._collect(conn, self.blobs.digests())

    def _delete_row(self, conn, name: str, tag: str) -> set[str] | None:
        """Inside a transaction: delete NAME:TAG; its digests (None if it did not exist)."""
        row = conn.execute("SELECT id FROM models WHERE name = ? AND tag = ?", (name, tag)).fetchone()
        if row is None:
            return None
        digests = {r[0] for r in conn.execute("SELECT digest FROM files WHERE model_id = ?", (row["id"],))}
        conn.execute("DELETE FROM models WHERE id = ?", (row["id"],))  # files go by ON DELETE CASCADE
        return digests

    def _collect(self, conn, candidates: set[str] | None) -> int:
        """Delete the candidates nothing refers to. The write lock is held while deleting, so no
        import can announce one of them and find it present in between."""
        if not candidates:
            return 0
        with index.transaction(conn):
            dead = index.unreferenced(conn, set(candidates))
            for digest in dead:
                self.blobs.delete(digest)
        return len(dead)

    # ------------------------------------------------------------------ integrity and use
    def verify(self, ref: str) -> ModelInfo:
        """Re-hash every blob of `ref`; CorruptBlobError naming the model and the files if any
        blob is missing or its content does not match its digest."""
        info = self.show(ref)
        problems = [f"{f.path}: {msg}" for f in info.files if (msg := self.blobs.check(f.digest))]
        if problems:
            raise CorruptBlobError(
                f"model {info.ref} failed verification: {'; '.join(problems)}; re-import it with "
                f"`qiusuo models import DIR --name {info.ref}` or remove it with `qiusuo models rm {info.ref}`")
        return info

    def materialized_path(self, ref: str) -> Path:
        name, tag = parse_name(ref)
        return self.models_dir / f"{name}@{tag}"

    def materialize(self, ref: str, *, verify: bool = True) -> Path:
        """A checkpoint directory with `ref`'s files, (re-)created if missing or stale. Every blob
        is re-hashed first unless verify=False, so a corrupt blob is reported, never served."""
        info = self.verify(ref) if verify else self.show(ref)
        target = self.materialized_path(info.ref)
        if self._is_complete(target, info):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            for f in info.files:
                dst = tmp / f.path
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.blobs.link_or_copy(f.digest, dst)
            self._install(tmp, target, info)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _is_complete(self, directory: Path, info: ModelInfo) -> bool:
        for f in info.files:
            p = directory / f.path
            if not p.is_file() or p.stat().st_size != f.size:
                return False
            blob = self.blobs.path(f.digest)
            # A hard link to the (just verified) blob is the blob; a copy must be re-hashed.
            if not (blob.exists() and os.path.samefile(p, blob)) and hash_file(p) != f.digest:
                return False
        return True

    def _install(self, tmp: Path, target: Path, info: ModelInfo) -> None:
        """Rename the finished `tmp` into place. Another process may be materializing the same
        model: if its directory is complete we use it, else we move the stale one aside."""
        for _ in range(5):
            try:
                os.rename(tmp, target)  # fails if target is a non-empty directory
                return
            except OSError:
                if self._is_complete(target, info):
                    return
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(target, old)
            except FileNotFoundError:
                continue  # someone else moved it aside; try again
            shutil.rmtree(old, ignore_errors=True)
        raise RegistryError(f"could not install {target}: other processes keep replacing it")

    def _drop_materialized(self, name: str, tag: str) -> None:
        shutil.rmtree(self.materialized_path(f"{name}:{tag}"), ignore_errors=True)
