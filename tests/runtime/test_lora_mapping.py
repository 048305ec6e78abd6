"""runtime/lora.map_tensors: an .onnx_adapter's tensors as OrtValues over the file's pages, equal to what
onnxruntime's own reader copies out of it."""

import gc

import numpy as np
import onnxruntime as ort

from edge_lora.export.adapters import write_adapter
from edge_lora.runtime import lora


def adapter_file(tmp_path, dtype=np.float32):
    rng = np.random.default_rng(0)
    tensors = {  # the shapes and names export/adapters.py writes, ranks 16 and 8, and an odd width
        "model.layers.0.self_attn.q_proj.lora_A": rng.standard_normal((64, 16)).astype(dtype),
        "model.layers.0.self_attn.q_proj.lora_B": rng.standard_normal((16, 64)).astype(dtype),
        "model.layers.1.mlp.down_proj.lora_A": rng.standard_normal((37, 8)).astype(dtype),
        "model.layers.1.mlp.down_proj.lora_B": rng.standard_normal((8, 5)).astype(dtype),
    }
    return write_adapter(tensors, tmp_path / f"{np.dtype(dtype).name}.onnx_adapter"), tensors


def assert_same(mapped: dict, expected: dict) -> None:
    assert set(mapped) == set(expected)
    for name, value in expected.items():
        got = mapped[name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_mapped_tensors_equal_onnxruntimes_reading_and_copy_nothing(tmp_path):
    for dtype in (np.float32, np.float16, np.int8):
        path, tensors = adapter_file(tmp_path, dtype)
        mapped = lora.map_tensors(path)
        assert isinstance(mapped, lora.MappedTensors)
        assert_same(mapped, tensors)
        read = ort.AdapterFormat.read_adapter(str(path))  # .numpy() views the OrtValue's memory: keep it alive
        assert_same(mapped, {k: v.numpy().copy() for k, v in read.get_parameters().items()})
        # every OrtValue's data lies inside the file's mapping: nothing was copied
        base = mapped.arrays[0].base
        while not isinstance(base, np.memmap):
            base = base.base
        lo, hi = base.ctypes.data, base.ctypes.data + base.nbytes
        assert all(lo <= value.data_ptr() < hi for value in mapped.values())


def test_the_mapping_lives_as_long_as_the_tensors(tmp_path):
    path, tensors = adapter_file(tmp_path)
    adapter = lora.Adapter(path)
    mapped = adapter.tensors
    del adapter
    gc.collect()
    assert_same(mapped, tensors)


def test_a_file_the_reader_does_not_expect_is_read_by_onnxruntime(tmp_path, monkeypatch):
    path, tensors = adapter_file(tmp_path)
    monkeypatch.setattr(lora, "NUMPY_TYPES", {})  # as if the file held a type without a numpy twin (bfloat16)
    read = lora.map_tensors(path)
    assert not isinstance(read, lora.MappedTensors)
    assert_same(read, tensors)
