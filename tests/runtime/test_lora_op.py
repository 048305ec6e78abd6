"""edge-lora's portable LoRA op (runtime/kernels, LoraAdd): built on this host for this host, equal to the branches
it replaces, its graph written by the export (export/kernel_graphs/lora_add.py) and taken by the runtime where
MatMulQ4 is not."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_lora.runtime import kernels
from edge_lora.runtime.kernels import LORA_ADD, build, lora_blob, lora_table

CHECK = Path(__file__).parent / "lora_add_check.cc"

pytestmark = pytest.mark.skipif(
    kernels.cpu_problem(LORA_ADD) is not None, reason=f"LoraAdd cannot run here: {kernels.cpu_problem(LORA_ADD)}"
)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return kernels.library(LORA_ADD, cache=tmp_path_factory.mktemp("kernels"))


def lora_session(library, k: int, n: int, slot: int = 0):
    """One LoraAdd node: z = y + the branches of x, every input fed."""
    node = helper.make_node("LoraAdd", ["y", "x", "lora"], ["z"], domain=kernels.DOMAIN, lora_slot=slot)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("lora", TensorProto.UINT8, ["bytes"]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def dequantized(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 A and B the op computes with (int8 with a scale per rank: kernels.quantize_pair)."""
    from edge_lora.runtime.kernels import quantize_pair

    qa, qb, scale, sa = quantize_pair(a, b)
    r, n = b.shape
    sb = scale / np.where(sa == 0, 1, sa)
    return qa * sa, qb.transpose(1, 0, 2).reshape(r, n) * sb[:, None]


@pytest.mark.parametrize("ranks", [(16, 0, 8), (32, 24, 64), (1, 17, 48)])
# decode's one row; prefill's rows, off 4's and 16's multiples
@pytest.mark.parametrize("shape", [(1,), (1, 1), (37,), (2, 9)])
def test_lora_add_adds_the_branches(library, shape, ranks):
    """q, k and v's three pairs in one node: rank 0 a projection the adapter leaves alone, ranks off 16's multiples
    ending with a part of a group of A's columns."""
    rng = np.random.default_rng(sum(shape) + sum(ranks))
    k, widths = 96, (64, 32, 48)
    pairs = [
        (rng.standard_normal((k, r), dtype=np.float32), rng.standard_normal((r, n), dtype=np.float32) * 0.1)
        for r, n in zip(ranks, widths)
    ]
    x = rng.standard_normal((*shape, k), dtype=np.float32)
    y = rng.standard_normal((*shape, sum(widths)), dtype=np.float32)
    z = lora_session(library, k, sum(widths)).run(None, {"y": y, "x": x, "lora": lora_table([lora_blob(pairs)])})[0]
    delta = np.concatenate(
        [x @ a @ b for a, b in (dequantized(a, b) if a.shape[1] else (a, b) for a, b in pairs)], axis=-1
    )
    assert z.shape == y.shape
    # (what int8 A and B lose against fp32 is MatMulQ4's too, bounded in tests/runtime/test_kernels.py)
    np.testing.assert_allclose(z, y + delta, rtol=0, atol=1e-5 * np.abs(y + delta).max())


def test_no_adapter_is_y_itself(library):
    rng = np.random.default_rng(1)
    y, x = rng.standard_normal((3, 32), dtype=np.float32), rng.standard_normal((3, 64), dtype=np.float32)
    z = lora_session(library, 64, 32).run(None, {"y": y, "x": x, "lora": lora_table([lora_blob([])])})[0]
    np.testing.assert_array_equal(z, y)


def test_bad_inputs_are_refused_by_name(library):
    rng = np.random.default_rng(2)
    blob = lora_blob([(rng.standard_normal((64, 4), dtype=np.float32), rng.standard_normal((4, 32), dtype=np.float32))])
    y, x = np.ones((2, 32), np.float32), np.ones((2, 64), np.float32)
    own = lora_session(library, 64, 32)
    with pytest.raises(Exception, match="LoraAdd: y and x must have the same rows .*: 2 and 3"):
        own.run(None, {"y": y, "x": np.ones((3, 64), np.float32), "lora": lora_table([blob])})
    with pytest.raises(Exception, match="LoraAdd: the LoRA input's size or widths do not match"):
        own.run(None, {"y": np.ones((2, 48), np.float32), "x": x, "lora": lora_table([blob])})
    with pytest.raises(Exception, match="LoraAdd: lora_slot 1 is not in the LoRA input's table of 1"):
        lora_session(library, 64, 32, slot=1).run(None, {"y": y, "x": x, "lora": lora_table([blob])})
    with pytest.raises(Exception, match="LoraAdd: the LoRA input's table does not fit it"):
        own.run(None, {"y": y, "x": x, "lora": lora_table([blob])[:16]})


def test_the_cache_key_holds_the_cpu(tmp_path, monkeypatch):
    """-march=native: a library built for one CPU is not taken on another (a cache shared over NFS, a moved disk)."""
    first = kernels.library(LORA_ADD, cache=tmp_path)
    assert kernels.library(LORA_ADD, cache=tmp_path) == first
    monkeypatch.setattr(build, "cpu_signature", lambda: "model name : another CPU")
    assert kernels.library(LORA_ADD, cache=tmp_path) != first


def test_cpu_signature_reads_x86_and_arm_lines(tmp_path):
    kernels.cpu_signature.cache_clear()
    try:
        x86, arm = tmp_path / "x86", tmp_path / "arm"
        x86.write_text(
            "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: sse2 avx2\ncpu MHz\t\t: 2600.1\n"
            "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: sse2 avx2\ncpu MHz\t\t: 2400.7\n"
        )
        arm.write_text(
            "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"
            "CPU part\t: 0xd0b\n"
        )
        assert kernels.cpu_signature(x86) == "flags\t\t: sse2 avx2\nmodel name\t: Some CPU"  # not the clock
        assert kernels.cpu_signature(arm) == "CPU implementer\t: 0x41\nCPU part\t: 0xd0b\nFeatures\t: fp asimd asimddp"
    finally:
        kernels.cpu_signature.cache_clear()


@pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (.ci/run installs them where apt-get can)",
)
def test_the_arm_build_adds_the_branches(tmp_path):
    """The op's NEON code, built for a Cortex-A76 (a Raspberry Pi 5) and run under qemu: its arithmetic against a
    double-precision sum (tests/runtime/lora_add_check.cc)."""
    binary = tmp_path / "check"
    subprocess.run(
        [
            "aarch64-linux-gnu-g++",
            "-O3",
            "-std=c++17",
            "-mcpu=cortex-a76",
            "-static",
            f"-I{kernels.SRC}",
            f"-I{kernels.ORT_HEADERS}",
            str(CHECK),
            "-o",
            str(binary),
        ],
        check=True,
        capture_output=True,
    )
    done = subprocess.run(["qemu-aarch64", str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert done.stdout.count(" ok\n") == 9 and "lanes 4" in done.stdout


def test_the_native_check_agrees(tmp_path):
    """The same check built for this host: the reference the Arm run is held to passes here too."""
    binary = tmp_path / "check"
    subprocess.run(
        [
            "c++",
            "-O3",
            "-std=c++17",
            "-march=native",
            f"-I{kernels.SRC}",
            f"-I{kernels.ORT_HEADERS}",
            str(CHECK),
            "-o",
            str(binary),
        ],
        check=True,
        capture_output=True,
    )
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.count(" ok\n") == 9, done.stdout


# ------------------------------------------------------------------------------------ the export and the runtime


@pytest.fixture(scope="module")
def lora_export(adapter_dir, second_adapter, tmp_path_factory, library):
    """Both adapters beside one builder int4 graph, for the Arm board's profile (which lists the LoRA op alone).
    Not gated, as tests/runtime/test_kernels.py's q4_export: blocks of 64 flip this tiny model's greedy near-ties."""
    from edge_lora.export import ExportOptions, export

    return export(
        [adapter_dir, second_adapter],
        tmp_path_factory.mktemp("lora") / "export",
        ExportOptions(
            precision="int4", flavor="adapters", graph="builder", int4_block_size=64, device="arm64-a76", validate=False
        ),
        show_progress=False,
    )


def test_export_writes_the_lora_graph_over_the_portable_weights(lora_export, adapter_dir, second_adapter):
    import onnx

    manifest = json.loads((lora_export / "export.json").read_text())
    assert list(manifest["kernels"]) == [LORA_ADD]
    entry = manifest["kernels"][LORA_ADD]
    assert entry["model_file"] == "model.lora.onnx" and entry["data_files"] == ["model.onnx.data"]
    assert entry["nodes"] == len(entry["lora_slots"]) == 2 * 5  # q/k/v packed, o, gate, up, down per layer
    assert "model.lora.onnx" in manifest["files"]
    assert not any(f.startswith("model.lora.onnx.") for f in manifest["files"])  # no weights of its own
    for name in (adapter_dir.name, second_adapter.name):
        assert entry["adapters"][name]["file"] == f"adapters/{name}.q4.onnx_adapter"
        assert entry["adapters"][name]["file"] in manifest["files"]
    graph = onnx.load(str(lora_export / "model.lora.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("LoraAdd") == 10 and "MatMul" not in ops and "Concat" not in ops
    portable = onnx.load(str(lora_export / "model.onnx"), load_external_data=False).graph
    assert ops.count("MatMulNBits") == [n.op_type for n in portable.node].count("MatMulNBits")
    assert [i.name for i in graph.input if i.name.endswith(("lora_A", "lora_B"))] == []


def test_runtime_takes_the_lora_graph_and_decodes_as_the_portable_one(lora_export, adapter_dir, second_adapter):
    from edge_lora import runtime

    fast, portable = runtime.load(lora_export), runtime.load(lora_export, kernels=())
    assert (fast.kernel, portable.kernel) == (LORA_ADD, None)
    config = runtime.SamplingConfig(max_new_tokens=12)
    prompt = "hello:"
    ids = fast.tokenizer.encode(prompt)
    base = portable.with_adapter(None).logits(ids)
    for name in (adapter_dir.name, second_adapter.name, None):
        a, b = fast.with_adapter(name), portable.with_adapter(name)
        assert a.generate(prompt, config).token_ids == b.generate(prompt, config).token_ids, name
        # the same MatMulNBits; int8 A and B against fp32: a small share of what the adapter does
        effect = np.abs(b.logits(ids) - base).max()
        assert np.abs(a.logits(ids) - b.logits(ids)).max() <= (0.05 * effect if name else 1e-5 * np.ptp(base)), name
        batch = ["hi", "hello there, friend:"]  # prefill's rows for a batch, left-padded
        assert [r.token_ids for r in a.generate_batch(batch, config)] == [
            r.token_ids for r in b.generate_batch(batch, config)
        ], name
    # an adapter in the portable form (as serve's uploads come) is converted for this graph as for MatMulQ4's
    from edge_lora.runtime.lora import Adapter

    upload = Adapter(lora_export / "adapters" / f"{second_adapter.name}.onnx_adapter")
    np.testing.assert_array_equal(
        fast.with_adapter("upload", adapter=upload).logits(ids), fast.with_adapter(second_adapter.name).logits(ids)
    )


def test_the_runtime_prefers_matmul_q4_then_the_lora_op(
    lora_export, adapter_dir, second_adapter, tmp_path, monkeypatch
):
    """The x86 profile lists both; an export carrying both graphs runs MatMulQ4's where it runs, else the LoRA op's,
    and a host whose CPU lacks MatMulQ4's instructions says nothing about it."""
    import warnings

    from edge_lora import runtime
    from edge_lora.export import ExportOptions, export

    both = export(
        [adapter_dir, second_adapter],
        tmp_path / "both",
        ExportOptions(
            precision="int4",
            flavor="adapters",
            graph="builder",
            int4_block_size=64,
            device="cpu-x86-64",
            validate=False,
        ),
        show_progress=False,
    )
    manifest = json.loads((both / "export.json").read_text())
    assert list(manifest["kernels"]) == ["matmul_q4", LORA_ADD]
    # the two graphs take one LoRA input in one order: the adapter files are written once
    assert manifest["kernels"][LORA_ADD]["adapters"] == manifest["kernels"]["matmul_q4"]["adapters"]
    if kernels.cpu_problem() is None:
        assert runtime.load(both).kernel == "matmul_q4"
    monkeypatch.setitem(kernels.CPU_FLAGS, kernels.MATMUL_Q4, ("no_such_flag",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generator = runtime.load(both)
    assert generator.kernel == LORA_ADD
    config = runtime.SamplingConfig(max_new_tokens=4)
    assert generator.with_adapter(adapter_dir.name).generate("hello:", config).token_ids


def test_profile_counts_the_shared_weights_file(lora_export, adapter_dir):
    """`edge-lora profile` on the LoRA op's graph: its model bytes are its own file and model.onnx.data, which it
    shares with model.onnx; its adapter is the int8 form."""
    from edge_lora.runtime.profile.sweep import ProfileSettings, profile

    settings = ProfileSettings(
        threads=(2,),
        prompt_lens=(8,),
        new_tokens=4,
        warmup_runs=0,
        min_runs=1,
        min_seconds=0.0,
        adapters=(adapter_dir.name,),
    )
    report = profile(lora_export, settings)
    graph = report.exports[0]["kernel_graphs"][LORA_ADD]
    sizes = {name: (lora_export / name).stat().st_size for name in ("model.lora.onnx", "model.onnx.data")}
    assert graph["model_bytes"] == sum(sizes.values())
    assert graph["adapter_bytes"][adapter_dir.name] < report.exports[0]["adapter_bytes"][adapter_dir.name]
    assert all(row["status"] == "ok" and row["model_file"] == "model.lora.onnx" for row in report.configurations)
