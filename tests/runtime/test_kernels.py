"""edge-lora's int4 kernel (runtime/kernels, MatMulQ4): built on this host, equal to onnxruntime's MatMulNBits on
the same weights, its graph written by the export (export/kernel_graphs/q4.py) and taken by the runtime."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_lora.runtime import kernels

pytestmark = pytest.mark.skipif(
    kernels.cpu_problem() is not None, reason=f"MatMulQ4 cannot run here: {kernels.cpu_problem()}"
)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return kernels.library(cache=tmp_path_factory.mktemp("kernels"))


def int4_weights(rng, k: int, n: int, block: int = 64):
    """MatMulNBits' (N, K/block, block/2) nibbles and (N · K/block) scales, and the fp32 matrix (K, N) they stand
    for."""
    q = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    # scales float16 holds exactly: MatMulQ4 keeps them as float16, MatMulNBits as fp32
    scales = (rng.random(n * (k // block), dtype=np.float32) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    values = np.empty((n, k // block, block), dtype=np.float32)
    values[..., 0::2], values[..., 1::2] = q & 15, q >> 4
    return q, scales, ((values - 8) * scales.reshape(n, -1, 1)).reshape(n, k).T


def session(library, node, initializers, k: int, lora: bool = False):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])]
    if lora:
        inputs.append(helper.make_tensor_value_info("lora", TensorProto.UINT8, ["bytes"]))
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid(kernels.DOMAIN, 1),
        ],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def pair_of_sessions(library, rng, k: int, n: int, lora: bool = False, block: int = 64):
    """MatMulNBits (accuracy_level 4) and MatMulQ4 on the same random int4 weights; and the fp32 matrix."""
    from edge_lora.export.kernel_graphs.q4 import repack

    q, scales, w = int4_weights(rng, k, n, block)
    mlas = session(
        library,
        helper.make_node(
            "MatMulNBits",
            ["x", "w", "s"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block,
            accuracy_level=4,
        ),
        [numpy_helper.from_array(q, "w"), numpy_helper.from_array(scales, "s")],
        k,
    )
    packed, tiled = repack(q, scales, k, n, block)
    own = session(
        library,
        helper.make_node(
            "MatMulQ4",
            ["x", "w", "s"] + (["lora"] if lora else []),
            ["y"],
            domain=kernels.DOMAIN,
            **({"lora_slot": 0} if lora else {}),
        ),
        [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(tiled, "s")],
        k,
        lora,
    )
    return mlas, own, w


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("rows", [1, 5])  # decode's path and prefill's
@pytest.mark.parametrize("k,n", [(64, 16), (192, 96), (128, 1040)])
def test_matmul_q4_equals_matmulnbits(library, rows, k, n, block):
    rng = np.random.default_rng(k + n + rows)
    mlas, own, w = pair_of_sessions(library, rng, k, n, block=block)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    expected, got = mlas.run(None, {"x": x})[0], own.run(None, {"x": x})[0]
    scale = np.abs(expected).max()
    # both quantize x per 64 to int8 the same way: they differ by float summation order only
    assert np.abs(got - expected).max() <= 1e-5 * scale
    assert np.abs(got - x @ w).max() > 1e-4 * scale  # and both differ from fp32 (the int8 activations): a real check


def test_weights_fed_as_inputs_are_checked_at_every_run(library):
    """The op reads w's and s's shapes once when they are initializers (as in every export); fed as graph inputs
    they are read at every run instead: the same product, and a wrong shape refused with its message."""
    from edge_lora.export.kernel_graphs.q4 import repack

    rng = np.random.default_rng(7)
    k, n = 128, 48
    q, scales, _ = int4_weights(rng, k, n)
    packed, tiled = repack(q, scales, k, n, 64)
    node = helper.make_node("MatMulQ4", ["x", "w", "s"], ["y"], domain=kernels.DOMAIN)
    constant = session(library, node, [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(tiled, "s")], k)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k]),
            helper.make_tensor_value_info("w", TensorProto.UINT8, None),
            helper.make_tensor_value_info("s", TensorProto.FLOAT16, None),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    fed = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for rows in (1, 3):
        x = rng.standard_normal((rows, k), dtype=np.float32)
        np.testing.assert_array_equal(
            fed.run(None, {"x": x, "w": packed, "s": tiled})[0], constant.run(None, {"x": x})[0]
        )
    with pytest.raises(Exception, match=r"MatMulQ4: s must be \(N/16, K/block, 16\), as w"):
        fed.run(None, {"x": x, "w": packed, "s": tiled[:, :1]})


def dequantize_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 A and B that MatMulQ4 computes with for these (what kernels.quantize_pair loses, made visible)."""
    from edge_lora.runtime.kernels import quantize_pair

    qa, qb, scale, sa = quantize_pair(a, b)
    r, n = b.shape
    sb = scale / np.where(sa == 0, 1, sa)
    return qa * sa, qb.transpose(1, 0, 2).reshape(r, n) * sb[:, None]


def test_scales_beyond_float16_keep_the_node_on_matmulnbits():
    """MatMulQ4 keeps scales as float16: a projection whose scales float16 cannot hold stays a MatMulNBits."""
    from edge_lora.export.kernel_graphs.q4 import qualifies

    q, scales, _ = int4_weights(np.random.default_rng(0), 64, 16)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "w", "s"],
        ["y"],
        domain="com.microsoft",
        K=64,
        N=16,
        bits=4,
        block_size=64,
        accuracy_level=4,
    )
    for top, fits in ((60000.0, True), (70000.0, False)):
        big = scales.copy()
        big[3] = top
        assert qualifies(node, {"w": numpy_helper.from_array(q, "w"), "s": numpy_helper.from_array(big, "s")}) is fits


@pytest.mark.parametrize("ranks", [(16, 0, 8), (32, 24, 64), (1, 17, 48)])
@pytest.mark.parametrize("rows", [1, 4])
def test_lora_branches_inside_the_node(library, rows, ranks):
    """Three pairs in one node as q, k and v share one: 0 is a projection the adapter leaves alone; ranks off 16's
    multiples end x · A with a partial group of columns."""
    from edge_lora.runtime.kernels import lora_blob, lora_table

    rng = np.random.default_rng(rows + sum(ranks))
    k, widths = 128, (64, 32, 48)
    mlas, own, _ = pair_of_sessions(library, rng, k, sum(widths), lora=True)
    pairs = [
        (rng.standard_normal((k, r), dtype=np.float32), rng.standard_normal((r, n), dtype=np.float32) * 0.1)
        for r, n in zip(ranks, widths)
    ]
    x = rng.standard_normal((rows, k), dtype=np.float32)
    delta = np.concatenate(
        [
            x @ a @ b if a.shape[1] else np.zeros((rows, b.shape[1]), np.float32)
            for a, b in (dequantize_pair(a, b) if a.shape[1] else (a, b) for a, b in pairs)
        ],
        axis=1,
    )
    base = mlas.run(None, {"x": x})[0]
    got = own.run(None, {"x": x, "lora": lora_table([lora_blob(pairs)])})[0]
    np.testing.assert_allclose(got, base + delta, rtol=0, atol=1e-4 * np.abs(base + delta).max())
    exact = np.concatenate([x @ a @ b for a, b in pairs], axis=1)
    # int8 A and B: within 1% of the branch's largest value (0.4% a pair measured on the reference shape)
    assert np.abs(delta - exact).max() <= 0.01 * np.abs(exact).max()
    # the header alone is no adapter
    np.testing.assert_allclose(
        own.run(None, {"x": x, "lora": lora_table([lora_blob([])])})[0], base, rtol=0, atol=1e-5 * np.abs(base).max()
    )


def test_decode_with_lora_gives_the_same_bits_run_after_run(library):
    """Decode: the first thread to arrive computes u = (x · A) · B while the other starts on its tiles and adds u to
    them once it is ready, so a tile takes either path from run to run; both must give the same bits."""
    from edge_lora.runtime.kernels import lora_blob, lora_table

    rng = np.random.default_rng(7)
    k, widths = 1536, (1536, 768, 768)  # u long enough to compute that the second thread often starts without it
    mlas, own, _ = pair_of_sessions(library, rng, k, sum(widths), lora=True)
    pairs = [
        (rng.standard_normal((k, 16), dtype=np.float32), rng.standard_normal((16, n), dtype=np.float32) * 0.1)
        for n in widths
    ]
    x = rng.standard_normal((1, k), dtype=np.float32)
    feed = {"x": x, "lora": lora_table([lora_blob(pairs)])}
    first = own.run(None, feed)[0]
    delta = np.concatenate([x @ a @ b for a, b in (dequantize_pair(a, b) for a, b in pairs)], axis=1)
    np.testing.assert_allclose(first, mlas.run(None, {"x": x})[0] + delta, rtol=0, atol=1e-4 * np.abs(first).max())
    for _ in range(30):
        np.testing.assert_array_equal(own.run(None, feed)[0], first)


def test_a_malformed_lora_input_is_refused_by_name(library):
    from edge_lora.runtime.kernels import lora_blob, lora_table

    rng = np.random.default_rng(0)
    _, own, _ = pair_of_sessions(library, rng, 64, 32, lora=True)
    blob = lora_blob([(np.ones((64, 4), np.float32), np.ones((4, 32), np.float32))])
    x = np.ones((1, 64), np.float32)
    with pytest.raises(Exception, match="MatMulQ4: the LoRA input's size"):
        own.run(None, {"x": x, "lora": lora_table([blob[:-64]])})
    wrong_width = lora_blob([(np.ones((64, 4), np.float32), np.ones((4, 16), np.float32))])
    with pytest.raises(Exception, match="MatMulQ4: the LoRA input's size or widths"):
        own.run(None, {"x": x, "lora": lora_table([wrong_width])})
    with pytest.raises(Exception, match="MatMulQ4: the LoRA input's table does not fit it"):
        own.run(None, {"x": x, "lora": lora_table([blob])[:16]})


def test_the_library_is_built_once_and_a_missing_compiler_says_so(tmp_path, monkeypatch):
    first = kernels.library(cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert kernels.library(cache=tmp_path) == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(kernels.KernelUnavailable, match="no C\\+\\+ compiler 'no-such-compiler'"):
        kernels.library(cache=tmp_path / "other")


def test_cpu_without_vnni_is_named(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n")
    assert kernels.cpu_problem(kernels.MATMUL_Q4, cpuinfo) == "this CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni"


# ------------------------------------------------------------------------------------ the export and the runtime


@pytest.fixture(scope="module")
def q4_export(adapter_dir, second_adapter, tmp_path_factory, library):
    """Both adapters beside one builder int4 graph in blocks of 64, for the x86 profile (which lists matmul_q4).
    Not gated: this model's rows are 64 wide, and int4 in blocks that coarse flips greedy near-ties of these
    adapters (the portable graph's own agreement falls below the gate's 90%; so does the second adapter's at blocks
    of 32). The gate on the kernel's graph is checked on the CPU profile's merged export
    (tests/export/test_builder_graph.py); here, that the kernel's graph computes what the portable graph does."""
    from edge_lora.export import ExportOptions, export

    return export(
        [adapter_dir, second_adapter],
        tmp_path_factory.mktemp("q4") / "export",
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


def test_export_writes_the_kernel_graph(q4_export, adapter_dir, second_adapter):
    manifest = json.loads((q4_export / "export.json").read_text())
    entry = manifest["kernels"]["matmul_q4"]
    assert entry["model_file"] == "model.q4.onnx" and entry["matmulnbits_left"] == 0
    assert entry["nodes"] == 2 * 5 + 1  # q/k/v, o, gate, up, down per layer, and the head
    assert set(entry["adapters"]) == {adapter_dir.name, second_adapter.name}
    assert {"model.q4.onnx", "model.q4.onnx.data", f"adapters/{adapter_dir.name}.q4.onnx_adapter"} <= set(
        manifest["files"]
    )
    assert len(entry["lora_slots"]) == 2 * 5  # one per adapted product: q/k/v packed, o, gate, up, down


def test_runtime_takes_the_kernel_graph_and_decodes_as_the_portable_one(q4_export, adapter_dir, second_adapter):
    from edge_lora import runtime
    from edge_lora.runtime.lora import Adapter

    fast, portable = runtime.load(q4_export), runtime.load(q4_export, kernels=())
    assert (fast.kernel, portable.kernel) == ("matmul_q4", None)
    config = runtime.SamplingConfig(max_new_tokens=12)
    prompt = "hello:"
    ids = fast.tokenizer.encode(prompt)
    base = portable.with_adapter(None).logits(ids)
    for name in (adapter_dir.name, second_adapter.name, None):
        a, b = fast.with_adapter(name), portable.with_adapter(name)
        assert a.generate(prompt, config).token_ids == b.generate(prompt, config).token_ids, name
        # float16 scales and int8 A and B against fp32: both graphs round activations to int8 per 64, so a nudge can
        # flip a rounding and move a logit by a quantum. Bounded by a small share of what the adapter does, and
        # without one of the logits' spread (measured: 0.06–0.07 against effects of 3.3–3.7; 0.058, 1% of it)
        effect = np.abs(b.logits(ids) - base).max()
        assert np.abs(a.logits(ids) - b.logits(ids)).max() <= (0.1 * effect if name else 0.02 * np.ptp(base)), name
    # an adapter in the portable form (as serve's uploads come) is converted for the kernel graph, once
    upload = Adapter(q4_export / "adapters" / f"{second_adapter.name}.onnx_adapter")
    converted = fast.with_adapter("upload", adapter=upload)
    ids = fast.tokenizer.encode(prompt)
    np.testing.assert_array_equal(converted.logits(ids), fast.with_adapter(second_adapter.name).logits(ids))
    assert fast.with_adapter("upload", adapter=upload)._adapter_inputs is converted._adapter_inputs


def test_a_kernel_that_cannot_be_built_falls_back_with_one_warning(q4_export, tmp_path, monkeypatch):
    """One warning for each kernel graph passed over, each naming the graph that runs instead."""
    from edge_lora import runtime

    monkeypatch.setenv("EDGE_LORA_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.warns(UserWarning) as caught:
        generator = runtime.load(q4_export)
    assert generator.kernel is None
    assert [str(w.message).split(" kernel is not available")[0] for w in caught] == [
        "edge-lora's matmul_q4",
        "edge-lora's lora_add",
    ]
    assert all(
        "no C++ compiler 'no-such-compiler'" in str(w.message) and str(w.message).endswith("running model.onnx instead")
        for w in caught
    )


def test_profile_describes_the_graph_that_ran(q4_export, adapter_dir):
    """`edge-lora profile` on a kernel export: each row names model.q4.onnx and counts its files and reads (float16
    scales, the head's original int4 weight read one row a token by the embedding), and the kernel form of the
    adapter; the export lists both graphs."""
    from edge_lora.export.graphs.weight_bytes import weight_bytes
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
    report = profile(q4_export, settings)
    export = report.exports[0]
    kernel = export["kernel_graphs"]["matmul_q4"]
    assert (export["model_file"], kernel["model_file"]) == ("model.onnx", "model.q4.onnx")
    files = json.loads((q4_export / "export.json").read_text())["files"]
    assert kernel["model_bytes"] == sum((q4_export / f).stat().st_size for f in files if f.startswith("model.q4.onnx"))
    assert export["model_bytes"] == sum((q4_export / f).stat().st_size for f in files if f.startswith("model.onnx"))
    assert kernel["weight_bytes_per_token"] == weight_bytes(q4_export / "model.q4.onnx")["weight_bytes_per_token"]
    assert kernel["weight_bytes_per_token"] < kernel["weight_bytes"]  # the embedding's table, a row a token
    assert kernel["adapter_bytes"][adapter_dir.name] != export["adapter_bytes"][adapter_dir.name]
    for row in report.configurations:
        assert row["status"] == "ok" and row["model_file"] == "model.q4.onnx"
        summary = row["summary"]
        assert (summary["model_bytes"], summary["weight_bytes_per_token"]) == (
            kernel["model_bytes"],
            kernel["weight_bytes_per_token"],
        )
        assert summary["adapter_bytes_per_token"] == kernel["adapter_bytes"].get(row["adapter"], 0)
    from edge_lora.runtime.profile.report import render_markdown

    assert f"; for matmul_q4: model.q4.onnx {kernel['model_bytes']:,} model bytes" in render_markdown(report, {})


def test_a_kernel_graph_in_an_older_format_runs_as_the_next_graph(q4_export, tmp_path):
    """An export whose kernel graph predates float16 scales (no "format" in its entry) warns and runs the next graph
    the export carries: the LoRA op's where it may, else model.onnx."""
    import shutil

    from edge_lora import runtime

    old = tmp_path / "old"
    shutil.copytree(q4_export, old)
    manifest = json.loads((old / "export.json").read_text())
    assert manifest["kernels"]["matmul_q4"].pop("format") == 2
    (old / "export.json").write_text(json.dumps(manifest))
    with pytest.warns(
        UserWarning,
        match="model.q4.onnx is in matmul_q4 format 1, this runtime's kernel takes format 2: "
        "running model.lora.onnx instead — re-run edge-lora export",
    ):
        assert runtime.load(old).kernel == "lora_add"
    with pytest.warns(UserWarning, match="format 2: running model.onnx instead — re-run edge-lora export"):
        generator = runtime.load(old, kernels=("matmul_q4",))
    assert generator.kernel is None and generator.generate("hello:", runtime.SamplingConfig(max_new_tokens=2)).token_ids


def test_uploads_in_the_portable_form_fit_a_kernel_graph(q4_export, second_adapter):
    """serve's hot-swap checks an upload against the portable graph's LoRA inputs (export.json), then converts it."""
    from edge_lora import runtime
    from edge_lora.runtime.lora import map_tensors
    from edge_lora.runtime.serve.admin import fit_problems, lora_inputs

    fast = runtime.load(q4_export)
    upload = map_tensors(q4_export / "adapters" / f"{second_adapter.name}.onnx_adapter")
    assert fit_problems(upload, lora_inputs(fast)) == []
    own_form = map_tensors(q4_export / "adapters" / f"{second_adapter.name}.q4.onnx_adapter")
    assert any("is not a LoRA input of this model" in p for p in fit_problems(own_form, lora_inputs(fast)))


def test_a_profile_names_only_known_kernels(tmp_path):
    from edge_lora import devices

    text = (
        devices.load("cpu-x86-64")
        .path.read_text()
        .replace('kernels = ["matmul_q4", "lora_add"]', 'kernels = ["matmul_q8"]')
    )
    path = tmp_path / "cpu-x86-64.toml"
    path.write_text(text)
    with pytest.raises(
        devices.DeviceProfileError,
        match=r"runtime.kernels = \[\"matmul_q8\"\]: expected a list of edge-lora kernels, "
        r"each one of matmul_q4, lora_add",
    ):
        devices.load(path)
    assert devices.load("arm64-a76").kernels == ("lora_add",)
    assert devices.load("apple-silicon").kernels == ()  # optional: a profile that leaves it out runs no kernel


def test_no_kernels_flags(q4_export, adapter_dir, tmp_path):
    """`edge-lora run --no-kernels` runs model.onnx and answers as the kernel graph does; `edge-lora export
    --no-kernels` writes no kernel graph."""
    from test_cli import edge_lora

    args = ["run", q4_export, "--adapter", adapter_dir.name, "--prompt", "hello:", "--max-new-tokens", "8"]
    fast, portable = edge_lora(*args), edge_lora(*args, "--no-kernels")
    assert fast.returncode == portable.returncode == 0, portable.stderr
    assert fast.stdout == portable.stdout and fast.stdout.strip()
    done = edge_lora(
        "export",
        adapter_dir,
        "--output",
        tmp_path / "plain",
        "--device",
        "cpu-x86-64",
        "--no-kernels",
        "--no-validate",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "plain" / "export.json").read_text())
    assert "kernels" not in manifest and "model.q4.onnx" not in manifest["files"]


def test_load_verifies_the_files_of_the_graph_it_opens(q4_export, tmp_path):
    """An x86 export carries the weights twice (model.onnx.data, model.q4.onnx.data): load hashes what the graph it
    opens reads, and the files every graph reads, not the other graphs' own."""
    import shutil

    from edge_lora import runtime

    copy = tmp_path / "export"
    shutil.copytree(q4_export, copy)
    with open(copy / "model.onnx.data", "r+b") as f:  # the portable graph's weights, one byte changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert runtime.load(copy).kernel == "matmul_q4"
    for kernels_ in ((), ("lora_add",)):  # both read model.onnx.data
        with pytest.raises(runtime.ExportError, match=r"model.onnx.data sha256 .* differs from export.json's"):
            runtime.load(copy, kernels=kernels_)
    (copy / "model.q4.onnx.data").unlink()
    with pytest.raises(runtime.ExportError, match=r"model.q4.onnx.data is missing — re-run edge-lora export"):
        runtime.load(copy)
    assert runtime.load(copy, verify=False, kernels=()).kernel is None  # (verify=False reads nothing)
