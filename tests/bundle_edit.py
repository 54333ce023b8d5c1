"""Copies of a bundle with an edited manifest, re-hashed as nmt-export writes it (for the self-check tests)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nmt.engine import bundle

Change = Callable[[dict[str, Any]], None]


def rewrite_manifest(source: Path, target: Path, change: Change) -> Path:
    """A copy of the bundle whose manifest `change(manifest)` edited in place."""
    shutil.copytree(source, target)
    manifest = json.loads((target / bundle.MANIFEST).read_text())
    change(manifest)
    fields = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", bundle.SELF_HASH)}
    bundle.write_manifest(target, fields)
    return target


def unvalidate(variant: str, tamper: bool = False) -> Change:
    """Mark `variant` as skipped at export (as fp16-cuda is without a GPU); optionally change the last
    token of the last reference sentence, so the self-check must fail."""

    def change(manifest: dict[str, Any]) -> None:
        manifest["variants"][variant]["validated"] = {"skipped": "no CUDA execution provider"}
        if tamper:
            tokens = manifest["parity"]["reference"]["tokens"]
            tokens[-1] = tokens[-1][:-1] + [tokens[-1][-1] + 1]

    return change
