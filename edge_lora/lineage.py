"""Lineage: what each artifact was made from, and `edge-lora inspect`, which walks that chain back.

An adapter dir's edge_lora.json names its parents: the base model (path or hub id, and fingerprint), the training
and eval data (path, sha256) and, in its data card, what the data checks found. An export's export.json gets a
`lineage` entry: every adapter it holds (name, path, sha256 of its weights file and of its edge_lora.json — the
adapter's version — its base and its data digests) and the export settings. inspect reads those records and
checks each parent that is still on disk against its recorded digest: matches, changed or missing.

Torch-free: inspecting an export on a device needs only the runtime's dependencies.
"""

from __future__ import annotations

from pathlib import Path

from edge_lora.errors import UsageError
from edge_lora.formats import ADAPTER_MANIFEST, ADAPTER_WEIGHTS, EXPORT_MANIFEST, AdapterManifest, sha256_file
from edge_lora.runtime.package import ExportDir


def data_digests(data: dict) -> dict:
    """The training and eval files an adapter was trained on (its manifest's `data`): {"train": {path, sha256,
    samples}, "eval": ... or None}."""
    data = data or {}
    return {
        split: ({k: data[split][k] for k in ("path", "sha256", "samples")} if data.get(split) else None)
        for split in ("train", "eval")
    }


def adapter_record(adapter_dir: Path, manifest: AdapterManifest, name: str) -> dict:
    """One adapter as an export records it. A foreign adapter (no edge_lora.json) has no manifest digest and no
    data; its record says how it was described instead."""
    adapter_dir = Path(adapter_dir)
    record = {
        "name": name,
        "path": str(adapter_dir.resolve()),
        "adapter_sha256": sha256_file(adapter_dir / ADAPTER_WEIGHTS),
        "manifest_sha256": None if manifest.foreign else sha256_file(adapter_dir / ADAPTER_MANIFEST),
        "base": {"model": manifest.base_model, "fingerprint": manifest.base_digest},
        "data": data_digests(manifest.data),
    }
    return record | ({"foreign": manifest.foreign} if manifest.foreign else {})


def export_lineage(adapter_dirs: list[Path], names: list[str], manifests: list[AdapterManifest], options) -> dict:
    """export.json's `lineage`: the adapters it was made from and the settings it was made with."""
    return {
        "adapters": [adapter_record(d, m, n) for d, m, n in zip(adapter_dirs, manifests, names)],
        "settings": dict(options.__dict__),
    }


def file_status(path: str | Path, sha256: str) -> str:
    path = Path(path)
    if not path.is_file():
        return "missing"
    return "matches" if sha256_file(path) == sha256 else "changed"


def base_node(base: dict, verify: bool) -> dict:
    node = {"kind": "base", "path": base["model"], "fingerprint": base["fingerprint"], "status": "not checked"}
    if verify:
        from edge_lora.train import manifest as adapter_manifest  # safetensors and torch: the train extra

        model_dir = Path(base["model"])
        if not (model_dir / "config.json").is_file():
            node["status"] = "missing"
        else:
            node["status"] = (
                "matches" if adapter_manifest.fingerprint(model_dir)["digest"] == base["fingerprint"] else "changed"
            )
    return node


def data_nodes(data: dict) -> list[dict]:
    return [
        {
            "kind": f"{split} data",
            "path": d["path"],
            "sha256": d["sha256"],
            "samples": d["samples"],
            "status": file_status(d["path"], d["sha256"]),
        }
        for split, d in data.items()
        if d
    ]


def adapter_node(record: dict, verify_base: bool, status: str) -> dict:
    node = {
        "kind": "adapter",
        "name": record["name"],
        "path": record["path"],
        "sha256": record["adapter_sha256"],
        "status": status,
    }
    if record.get("foreign"):
        node["foreign"] = record["foreign"]
    elif (Path(record["path"]) / ADAPTER_MANIFEST).is_file():
        card = AdapterManifest.load(record["path"]).data_card
        if card:
            node["data_card"] = card_summary(card)
    node["parents"] = [base_node(record["base"], verify_base), *data_nodes(record["data"])]
    return node


def card_summary(card: dict) -> str:
    train = card["train"]
    text = (
        f"{train['samples']} samples, tokens p50 {train['tokens']['p50']} max {train['tokens']['max']}, "
        f"{train['truncated']} truncated, {train['exact_duplicates']['count']} exact + "
        f"{train['near_duplicates']['count']} near duplicates"
    )
    if card.get("overlap"):
        o = card["overlap"]
        text += f", eval overlap {o['count']}/{card['eval']['samples']}" + (
            " (allowed)" if o["count"] and o["allowed"] else ""
        )
    return text


def inspect(path: str | Path, verify_base: bool = False) -> dict:
    """The lineage of an export dir or an adapter dir, as a tree of nodes with "parents"."""
    path = Path(path)
    if (path / EXPORT_MANIFEST).is_file():
        from edge_lora.runtime.package import open_export

        export = open_export(path, verify=False)
        return export_node(export, verify_base)
    if (path / ADAPTER_MANIFEST).is_file():
        manifest = AdapterManifest.load(path)
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise UsageError(
                f"{path} has {ADAPTER_MANIFEST} but no {ADAPTER_WEIGHTS} — restore the file or train again"
            )
        return adapter_node(adapter_record(path, manifest, path.resolve().name), verify_base, "this dir")
    raise UsageError(
        f"{path} is neither an export dir ({EXPORT_MANIFEST}) nor an adapter dir ({ADAPTER_MANIFEST}) — "
        "pass the --output dir of edge-lora export or edge-lora train"
    )


def export_node(export: ExportDir, verify_base: bool) -> dict:
    m = export.manifest
    lineage = m.lineage
    if lineage is None:  # an export written before lineage was recorded: its source adapter's manifest is embedded
        source = m.source_adapter
        records = [
            {
                "name": Path(source["path"]).name,
                "path": source["path"],
                "adapter_sha256": None,
                "base": {
                    "model": source["manifest"]["base_model"],
                    "fingerprint": source["manifest"]["base_fingerprint"]["digest"],
                },
                "data": data_digests(source["manifest"].get("data")),
            }
        ]
    else:
        records = lineage["adapters"]
    parents = []
    for record in records:
        weights = Path(record["path"]) / ADAPTER_WEIGHTS
        status = "not recorded" if record["adapter_sha256"] is None else file_status(weights, record["adapter_sha256"])
        parents.append(adapter_node(record, verify_base, status))
    return {
        "kind": "export",
        "path": str(export.path.resolve()),
        "digest": export.digest(),
        "flavor": m.flavor,
        "precision": m.precision,
        "opset": m.opset,
        "device": m.device,
        "settings": (lineage or {}).get("settings", m.options),
        "parents": parents,
    }


def render(node: dict, prefix: str = "", last: bool = True, root: bool = True) -> str:
    """The tree as text, one node a line, parents indented under what was made from them."""
    line = describe(node)
    lines = [line if root else f"{prefix}{'└── ' if last else '├── '}{line}"]
    child_prefix = "" if root else prefix + ("    " if last else "│   ")
    parents = node.get("parents", [])
    for i, parent in enumerate(parents):
        lines.append(render(parent, child_prefix, i == len(parents) - 1, root=False))
    return "\n".join(lines)


def describe(node: dict) -> str:
    kind = node["kind"]
    if kind == "export":
        return (
            f"export {node['path']}  ({node['flavor']}, {node['precision']}, opset {node['opset']}, device "
            f"{node['device']})  digest {node['digest'][:12]}"
        )
    status = f"  [{node['status']}]"
    if kind == "adapter":
        version = node["sha256"][:12] if node["sha256"] else "?"
        card = f"  data card: {node['data_card']}" if node.get("data_card") else ""
        foreign = f"  foreign PEFT adapter, trained on {node['foreign']['trained_on']}" if node.get("foreign") else ""
        return f"adapter {node['name']}  {node['path']}  sha256 {version}{status}{foreign}{card}"
    if kind == "base":
        return f"base {node['path']}  fingerprint {node['fingerprint'][:12]}{status}"
    return f"{kind} {node['path']}  sha256 {node['sha256'][:12]}  {node['samples']} samples{status}"
