"""Write a Hugging Face hub cache the way ``huggingface_hub`` lays it out on disk.

For each repo ``<org>/<name>`` of type ``model`` or ``dataset``::

    <cache>/<type>s--<org>--<name>/
        blobs/<etag>                   file contents, named by their hub etag: the sha256 of the
                                       content for LFS files (weights, parquet), the git blob sha1
                                       (``git hash-object``) for regular files
        refs/main                      the commit hash main points to (no trailing newline)
        snapshots/<commit>/<path>      relative symlinks to ../../blobs/<etag>

(see huggingface_hub's cache guide and ``file_download._create_symlink``). Everything that reads
the cache offline (``hf_hub_download``, ``from_pretrained`` with ``HF_HUB_OFFLINE=1``,
``scan_cache_dir``) resolves ``refs/main`` -> ``snapshots/<commit>/<path>``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Extensions the hub stores with Git LFS (the default .gitattributes of a new repo).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".parquet", ".arrow", ".model", ".h5", ".msgpack")


def etag(rel_path: str, data: bytes) -> str:
    from huggingface_hub.utils.sha import git_hash

    if rel_path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return git_hash(data)


def repo_folder(cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    return Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def write_repo(cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Lay out ``files`` ({path in repo: content}) as one commit of ``repo_id`` on main; returns the
    snapshot folder."""
    tags = {p: etag(p, d) for p, d in files.items()}
    # A stable 40-hex commit id derived from the content (a real one is the git commit sha1).
    commit = hashlib.sha1("".join(f"{p}:{t}\n" for p, t in sorted(tags.items())).encode()).hexdigest()
    root = repo_folder(cache, repo_id, repo_type)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    for path, data in files.items():
        blob = root / "blobs" / tags[path]
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
