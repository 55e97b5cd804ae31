"""checkpoint_utils/safetensors_writer.py: files written tensor by tensor, in chunks, read back
bit for bit by the safetensors library and by our reader."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoint_utils.safetensors_reader import SafetensorsFile
from checkpoint_utils.safetensors_writer import SafetensorsWriter


def chunks(array: np.ndarray, rows: int):
    for start in range(0, array.shape[0], rows):
        yield array[start:start + rows]


def test_chunked_tensors_read_back_by_the_library_and_our_reader(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((7, 5), dtype=np.float32), "a.bias": np.arange(3, dtype=np.int64),
               "b": rng.standard_normal((9, 2, 3)).astype(ml_dtypes.bfloat16)}
    path = str(tmp_path / "x.safetensors")
    with SafetensorsWriter(path, {k: (v.shape, v.dtype) for k, v in tensors.items()}, {"format": "pt"}) as writer:
        for name, value in tensors.items():
            writer.write(name, chunks(value, 2))                 # uneven last chunk
    ours = SafetensorsFile(path)
    assert ours.metadata == {"format": "pt"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours.read(name).view(np.uint8), value.view(np.uint8))
    import torch
    from safetensors.torch import load_file as load_torch
    library = load_torch(path)                                  # the library reads bfloat16 through torch
    assert library["b"].dtype == torch.bfloat16
    np.testing.assert_array_equal(library["b"].view(torch.int16).numpy(), tensors["b"].view(np.int16))
    plain = str(tmp_path / "plain.safetensors")
    with SafetensorsWriter(plain, {"a.weight": ((7, 5), np.float32)}) as writer:
        writer.write("a.weight", [tensors["a.weight"]])
    np.testing.assert_array_equal(load_file(plain)["a.weight"], tensors["a.weight"])


def test_wrong_order_size_or_missing_tensor_is_an_error(tmp_path):
    spec = {"a": ((2, 2), np.float32), "b": ((3,), np.float32)}
    with pytest.raises(ValueError, match="header order"):
        with SafetensorsWriter(str(tmp_path / "1.safetensors"), spec) as writer:
            writer.write("b", [np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="wrote 8 bytes"):
        with SafetensorsWriter(str(tmp_path / "2.safetensors"), spec) as writer:
            writer.write("a", [np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match="not written"):
        with SafetensorsWriter(str(tmp_path / "3.safetensors"), spec) as writer:
            writer.write("a", [np.zeros((2, 2), np.float32)])
