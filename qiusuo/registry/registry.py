"""`Registry`: import, list, show, tag, remove, verify and materialize checkpoints by name.

Ollama's habits: models are `NAME[:TAG]` with tag `latest` by default; `tag` copies a reference,
never bytes; removing a model deletes the blobs no other model uses. Layout under `QIUSUO_HOME`
(default `~/.qiusuo`):

    registry.db                  SQLite index (models, files, pending imports)
    blobs/sha256-<hex>           one file per distinct content, read-only
    models/<name>@<tag>/         a materialized checkpoint: hard links to (or copies of) blobs
    leases/<name>@<tag>/lock     held (flock, shared) by every process using that directory
    leases/<name>@<tag>/holder-* who holds it: pid and command line, for the refusal message

`@` cannot occur in a name, so `a/b@latest` and `a@b` never share a directory (`<name>/<tag>`
would put model `a:b` and model `a/b` in the same place).

Safety: `QIUSUO_HOME` is created 0700 (checkpoints and their metadata are the user's). Import
reads only files inside the checkpoint directory: a symlink is followed only when its target is
inside it (or, for a Hugging Face cache snapshot, inside that repository's `blobs/`); anything
else is refused naming the link. `resolve_model` takes a lease on the directory it returns for
the life of the process; `rm`, `tag` onto and re-import of a model whose directory is leased are
refused with the holders' command lines (a crashed holder's flock dies with it, so there is no
stale refcount to clean).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import index
from .blobs import BlobStore, hash_file
from .adapters import ADAPTER_TYPE, adapter_info, is_adapter_dir
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

    @property
    def adapter_of(self) -> str | None:
        """The base model (NAME:TAG) of a LoRA adapter entry; None for a full model."""
        return self.metadata.get("adapter_of") if self.model_type == ADAPTER_TYPE else None


def default_home() -> Path:
    return Path(os.environ.get("QIUSUO_HOME") or "~/.qiusuo").expanduser()


def _allowed_roots(path: Path) -> list[Path]:
    """Where symlinks under `path` may lead: inside it, and for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<rev>/`) into that repository's own `blobs/`."""
    root = path.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir() \
            and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def _checkpoint_files(path: Path) -> list[tuple[str, Path]]:
    """(relative '/'-path, file) for every file under `path`; hidden files and folders skipped
    (editor swap files, `.git`, save_model's temporaries). Symlinks are followed only into the
    allowed roots (see `_allowed_roots`); one leading elsewhere is a RegistryError, never read."""
    roots = _allowed_roots(path)
    out = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in list(dirnames):
            if (here / name).is_symlink():
                raise RegistryError(f"{here / name} is a symlinked directory; import copies regular files only "
                                    "(replace the link with the directory's content)")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = here / name
            if p.is_symlink():
                target = p.resolve()
                if not any(target.is_relative_to(r) for r in roots):
                    raise RegistryError(f"{p} is a symlink to {target}, outside the checkpoint directory; "
                                        "refusing to import it (copy the file in if it belongs to the model)")
            if p.is_file():
                out.append((p.relative_to(path).as_posix(), p))
    return sorted(out)


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
        make_private_dir(self.home)
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
                   eval_score: float | None = None, metadata: dict[str, Any] | None = None,
                   base: str | None = None) -> ModelInfo:
        """Copy the checkpoint directory `path` into the store as `name` (NAME[:TAG]); an existing
        NAME:TAG is replaced atomically and the blobs only it used are deleted.

        A LoRA adapter directory (adapter_config.json, no config.json) is stored as a small model that
        names its base (adapters.py): `base` (NAME[:TAG] in this registry), by default the adapter
        config's base_model_name_or_path.

        source_run / eval_score default to qiusuo.json's `run_dir` / `eval`; `metadata` is merged
        over qiusuo.json's content."""
        name, tag = parse_name(name)
        path = Path(path)
        if is_adapter_dir(path):
            info, files = adapter_info(self, path, base)
            if info["metadata"]["adapter_of"] == f"{name}:{tag}":
                raise RegistryError(f"an adapter cannot replace its own base {name}:{tag}; import it under another "
                                    "name or tag")
        elif base is not None:
            raise RegistryError(f"--base is for LoRA adapter directories; {path} has no {'adapter_config.json'}")
        else:
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
        # the exclusive lease is held until the old directory is gone: no server can start on it meanwhile
        with self._unused(name, tag, "re-import"):
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
        with self._unused(name, tag, "replace"), self._connect() as conn:
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
        """Delete NAME[:TAG] and every blob no other model uses (refused while a process that
        resolved it is running: see `lease`)."""
        name, tag = parse_name(ref)
        if not self.db_path.exists():
            raise self._unknown(f"{name}:{tag}")
        users = [m.ref for m in self.list() if m.adapter_of == f"{name}:{tag}"]
        if users:
            raise RegistryError(f"cannot remove {name}:{tag}: it is the base of the adapter(s) {', '.join(users)}; "
                                "remove them first")
        with self._unused(name, tag, "remove"), self._connect() as conn:
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

    # ------------------------------------------------------------------ leases
    def _lease_dir(self, name: str, tag: str) -> Path:
        """leases/<name>@<tag>/ ('/' in a name as '%', which cannot occur in one), created 0700."""
        make_private_dir(self.home)
        (self.home / "leases").mkdir(mode=0o700, exist_ok=True)
        d = self.home / "leases" / f"{name.replace('/', '%')}@{tag}"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def lease(self, ref: str, holder: str | None = None) -> "Lease":
        """Mark NAME[:TAG]'s materialized directory as in use until `Lease.release()` (or this
        process exits): rm, tag onto and re-import of it are refused meanwhile. `holder` names
        the user in the refusal (default: this process's command line)."""
        name, tag = parse_name(ref)
        d = self._lease_dir(name, tag)
        fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a remove holds it exclusively
        note = d / f"holder-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        description = holder or " ".join(sys.argv)[:300] or "python"
        note.write_text(json.dumps({"pid": os.getpid(), "holder": description, "since": time.time()}))
        return Lease(fd, note)

    def holders(self, ref: str) -> list[str]:
        """Who holds a lease on NAME[:TAG] ('pid N: command line'), from the notes of live leases."""
        name, tag = parse_name(ref)
        out = []
        for note in sorted(self._lease_dir(name, tag).glob("holder-*")):
            try:
                info = json.loads(note.read_text())
                os.kill(int(info["pid"]), 0)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a note of a process that died: its flock went with it
            out.append(f"pid {info['pid']}: {str(info['holder'])[:200]}")
        return out

    def _unused(self, name: str, tag: str, action: str):
        """A context in which NAME:TAG's directory is ours to delete: RegistryError naming the
        holders when a lease exists. Writers queue on `write` (short waits: imports, tags,
        removes of the same name), then take the lease lock exclusively without waiting, which
        fails exactly when a lease (a shared lock) is held."""
        registry = self

        class _Exclusive:
            def __enter__(self):
                d = registry._lease_dir(name, tag)
                self.queue = os.open(d / "write", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self.queue, fcntl.LOCK_EX)
                self.fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.__exit__()
                    holders = registry.holders(f"{name}:{tag}") or ["a process that did not say who it is"]
                    raise RegistryError(
                        f"cannot {action} {name}:{tag}: its directory {registry.materialized_path(f'{name}:{tag}')} "
                        f"is in use by {'; '.join(holders)}. Stop that server/deployment first, or import "
                        "under a new tag") from None
                for note in d.glob("holder-*"):
                    note.unlink(missing_ok=True)  # notes of holders that died (no lease is held)
                return self

            def __exit__(self, *exc):
                os.close(self.fd)  # releases the flocks
                os.close(self.queue)
                return False

        return _Exclusive()


class Lease:
    """A held lease (see Registry.lease); released by `release()` or at process exit."""

    def __init__(self, fd: int, note: Path):
        self.fd, self.note = fd, note

    def release(self) -> None:
        if self.fd is not None:
            self.note.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) with the last component 0700 when we create it; an existing
    directory is left as the user set it."""
    if path.exists() and not path.is_dir():
        raise RegistryError(f"the registry home {path} is not a directory; point QIUSUO_HOME at a directory "
                            "(it is created, mode 0700, if missing)")
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
