"""Fixtures of the server tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from serve_support import CHAT_TEMPLATE


@pytest.fixture(scope="session")
def served_export(adapter_dir, tmp_path_factory) -> Path:
    """An `adapters` export of the conftest adapter (base + one adapter) whose tokenizer has a chat template.

    Built once per session even though each server test module asks for it: the first one leaves it in the
    session's base temp dir.
    """
    from edge_lora.export import ExportOptions, export
    from edge_lora.formats import EXPORT_MANIFEST
    from edge_lora.runtime.package import sha256_file

    done = tmp_path_factory.getbasetemp() / "served-export"
    if (done / EXPORT_MANIFEST).exists():
        return done
    built = export(
        adapter_dir, tmp_path_factory.mktemp("serve") / "export", ExportOptions(flavor="adapters"), show_progress=False
    )
    config_path = built / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    manifest = json.loads((built / EXPORT_MANIFEST).read_text())
    manifest["files"]["tokenizer_config.json"] = sha256_file(config_path)
    (built / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    shutil.move(built, done)
    return done
