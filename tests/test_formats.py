"""llmcli.formats.safetensors: the torch-free header reader that loading and `show` share.

Oracles: files written by the safetensors library (save_file) and sharded by huggingface_hub, whose bytes
at each reported offset must decode to the saved tensor; broken files are cut or hand-written from those.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmcli.errors import LlmcliError
from llmcli.formats.safetensors import (
    DTYPE_BYTES,
    DTYPE_NAMES,
    INDEX_NAME,
    checkpoint_files,
    read_checkpoint,
    read_header,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    base = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    return {
        "f32": base, "f64": base.double(), "f16": base.half(), "bf16": base.bfloat16(),
        "fp8_e4m3": base.to(torch.float8_e4m3fn), "fp8_e5m2": base.to(torch.float8_e5m2),
        "i64": torch.arange(7), "i32": torch.arange(5, dtype=torch.int32), "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(6, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A .safetensors file written by hand, for headers the library refuses to write."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(LlmcliError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_header_of_a_library_written_file(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    entries = read_header(path)
    assert set(entries) == set(tensors)  # __metadata__ is not a tensor
    data = path.read_bytes()
    for name, t in tensors.items():
        e = entries[name]
        assert e.file == path and DTYPE_NAMES[e.dtype] == str(t.dtype).removeprefix("torch.")
        assert e.shape == tuple(t.shape) and e.numel == t.numel()
        assert e.nbytes == t.numel() * DTYPE_BYTES[e.dtype] == t.numel() * t.element_size()
        assert data[e.start: e.start + e.nbytes] == raw_bytes(t)
    # The tensors tile the data section, which ends the file.
    spans = sorted((e.start, e.start + e.nbytes) for e in entries.values())
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    assert spans[-1][1] == len(data)


def test_sharded_checkpoint_with_index(tmp_path):
    from huggingface_hub import save_torch_state_dict

    tensors = {f"layer.{i}.weight": torch.full((16, 16), float(i)) for i in range(6)}
    save_torch_state_dict(tensors, tmp_path, max_shard_size=2500)  # about two tensors a shard
    save_file({"stray": torch.ones(2)}, str(tmp_path / "stray.safetensors"))  # not in the index: not read
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(tmp_path / name for name in set(weight_map.values()))
    assert len(shards) > 1 and checkpoint_files(tmp_path) == shards
    entries = read_checkpoint(tmp_path)
    assert set(entries) == set(tensors)
    for name, e in entries.items():
        assert e.file == tmp_path / weight_map[name]
        assert e.file.read_bytes()[e.start: e.start + e.nbytes] == raw_bytes(tensors[name])
    (tmp_path / INDEX_NAME).unlink()  # without an index: every *.safetensors, sorted
    assert checkpoint_files(tmp_path) == sorted([*shards, tmp_path / "stray.safetensors"])
    assert "stray" in read_checkpoint(tmp_path)


def test_no_safetensors_files(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")  # refusing pickles is loading's message, not the reader's
    assert checkpoint_files(tmp_path) == [] and read_checkpoint(tmp_path) is None


@pytest.fixture
def small_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, str(path))
    return path


def test_truncated_files(small_file):
    data = small_file.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for size, expected in [(0, "file too short"), (5, "file too short"),
                           (header_end // 2, "runs past the end of the file"),
                           (len(data) - 1, "is truncated: tensor")]:
        small_file.write_bytes(data[:size])
        message = error_of(read_header, small_file)
        assert str(small_file) in message and expected in message, (size, message)
        if size < header_end:
            assert "is not a readable safetensors file" in message


def test_header_length_past_the_file_or_absurd(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    assert "header length 1000 runs past the end of the file (10 bytes)" in error_of(read_header, path)
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")  # never allocated, never read
    assert "over the 100000000-byte limit" in error_of(read_header, path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    assert "not a JSON object" in error_of(read_header, path)


def test_wrong_byte_length(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
                     bytes(16))
    assert error_of(read_header, path).endswith("tensor w has 12 bytes for shape (2, 2) of F32 (expected 16)")


@pytest.mark.parametrize("entry, expected", [
    ({"shape": [2], "data_offsets": [0, 8]}, "no 'dtype'"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "shape [-2] or data_offsets [0, 8] are not valid"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "shape [2] or data_offsets [8, 0] are not valid"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "not enough values"),
    ({"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}, "unknown dtype 'F4'"),
])
def test_bad_entries(tmp_path, entry, expected):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry}, bytes(8))
    message = error_of(read_header, path)
    assert f"bad header entry for w: {expected}" in message and str(path) in message


def test_unknown_dtypes_on_request(tmp_path):
    """`show` reports dtypes the table lacks (their byte range is still checked); loading refuses them."""
    path = write_raw(tmp_path / "x.safetensors", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}},
                     bytes(2))
    (entry,) = read_header(path, unknown_dtypes=True).values()
    assert (entry.dtype, entry.shape, entry.start, entry.nbytes) == ("F4", (4,), path.stat().st_size - 2, 2)
    path.write_bytes(path.read_bytes()[:-1])
    assert "is truncated" in error_of(read_header, path, unknown_dtypes=True)


def test_index_problems(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    index = tmp_path / INDEX_NAME
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    for call in (checkpoint_files, read_checkpoint):
        assert error_of(call, tmp_path) == f"{tmp_path / 'two.safetensors'} is listed in the index but missing"
    # show's view: a checkpoint whose weights are not all downloaded
    assert checkpoint_files(tmp_path, missing_ok=True) == [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    assert read_checkpoint(tmp_path, missing_ok=True) is None
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "one.safetensors"}}))
    assert error_of(read_checkpoint, tmp_path) == f"tensor b is listed in {INDEX_NAME} but not in one.safetensors"
    for broken in ("{", "[]", '{"weight_map": [1]}', '{"weight_map": {"a": 1}}'):
        index.write_text(broken)
        assert "is not a valid safetensors index" in error_of(checkpoint_files, tmp_path, missing_ok=True)


def test_loading_maps_every_dtype_to_torch(tmp_path):
    from llmcli.weights import Checkpoint

    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            got = ckpt.get(name)
            assert got.dtype == t.dtype and raw_bytes(got) == raw_bytes(t)


def test_loading_without_safetensors_files(tmp_path):
    from llmcli.weights import Checkpoint

    assert error_of(Checkpoint, tmp_path) == f"{tmp_path} has no *.safetensors weights"
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert "has only pickle weights" in error_of(Checkpoint, tmp_path)


def imported_torch(code: str) -> bool:
    probe = code + "\nimport sys\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1] == "True"


def test_reader_and_show_do_not_import_torch():
    assert not imported_torch("import llmcli.formats.safetensors, llmcli.show")


def test_show_of_a_model_on_disk_does_not_import_torch(tmp_path):
    config = {"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(10, 8)}, str(tmp_path / "model.safetensors"))
    assert not imported_torch(f"from llmcli.show import describe\ndescribe({str(tmp_path)!r})")
