"""An export folder's `manifest.json`: the sha256 of every file and of the base model the adapter was trained on.

`fedshop export` writes it; `fedshop export --verify`, `init-adapter` (continued training) and `fedshop predict`
check an export against it.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.errors import UserError
from shared.files import reading, sha256

MANIFEST = "manifest.json"


def write_manifest(out: Path, base_sha256: str, extra: dict | None = None) -> None:
    files = {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": "fedshop-export/1", "base-model-sha256": base_sha256, **(extra or {}), "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def verify(out: str | Path) -> list[str]:
    """The problems of an export folder against its manifest (empty when every file matches)."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out} is not a fedshop export (no {MANIFEST})")
    files = read_manifest(out)["files"]
    problems = [f"{name}: missing" for name in files if not (out / name).is_file()]
    problems += [f"{name}: sha256 differs from the manifest" for name, digest in files.items()
                 if (out / name).is_file() and sha256(out / name) != digest]
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems += [f"{name}: not in the manifest" for name in sorted(present - set(files))]
    return problems


def check_base(export: Path, base_file: Path, what: str) -> None:
    """UserError unless `base_file` is the base model the export's adapter was trained on (manifest's sha256)."""
    manifest = read_manifest(export)
    if not base_file.is_file() or sha256(base_file) != manifest.get("base-model-sha256"):
        raise UserError(f"{what}: {base_file} is not the base this adapter was trained on (its sha256 differs from "
                        f"{export / MANIFEST}'s base-model-sha256)")


def read_manifest(export: Path) -> dict:
    """An export's manifest: a JSON object whose "files" maps each file to its sha256; UserError naming it if not."""
    path = Path(export) / MANIFEST
    with reading(path, "a fedshop export manifest (JSON with \"files\": {name: sha256})"):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
            raise ValueError("no \"files\" object of names and digests")
    return manifest
