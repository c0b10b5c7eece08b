"""What `show` says about a GGUF model beyond the common facts: the tensor types (llama.cpp's quantisations)
with their counts and bytes, per tensor in --json, and where its tokenizer and template come from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmcli.config import ModelConfig
from llmcli.formats.gguf import GGUFFile, gguf_path_of, nearest_quantize, open_gguf  # noqa: F401  (gguf_path_of: show)
from llmcli.formats.gguf_config import gguf_config
from llmcli.formats.gguf_int4 import Q6_TYPES, int8_runs_take_as_stored
from llmcli.formats.gguf_names import checkpoint_pieces, tensor_infos
from llmcli.formats.safetensors import TensorInfo


@dataclass
class GGUFModel:
    gguf: GGUFFile
    config: ModelConfig
    tensors: dict[str, TensorInfo]  # checkpoint names, as loading reads them


def open_for_show(path: Path) -> GGUFModel:
    gg = open_gguf(path)
    cfg = gguf_config(gg)
    return GGUFModel(gg, cfg, tensor_infos(gg, checkpoint_pieces(gg, cfg)))


def gguf_facts(model: GGUFModel) -> dict:
    gg = model.gguf
    types: dict[str, dict] = {}
    for t in gg.tensors.values():
        entry = types.setdefault(t.type_name, {"tensors": 0, "bytes": 0, "params": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
        entry["params"] += t.numel
    ordered = dict(sorted(types.items(), key=lambda item: -item[1]["bytes"]))
    pre = gg.metadata.get("tokenizer.ggml.pre", "default")
    bits = gg.layer_bits()
    runs_as, layer_types = nearest_quantize(bits), gg.layer_types()
    return {
        "format": "gguf",
        "architecture": f"GGUF {gg.architecture}",
        "dtype_on_disk": next(iter(ordered), None),
        "dtype_bytes_on_disk": {name: entry["bytes"] for name, entry in ordered.items()},
        "tensor_types": ordered,
        "gguf_tensors": [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes}
                         for t in gg.tensors.values()],
        "gguf_files": [str(f) for f in gg.files],
        "gguf_name": gg.metadata.get("general.name"),
        "chat_template": "GGUF metadata (tokenizer.chat_template)"
        if isinstance(gg.metadata.get("tokenizer.chat_template"), str) else None,
        "tokenizer": f"GGUF metadata ({gg.metadata.get('tokenizer.ggml.model')} BPE, pre-tokenizer {pre})",
        "size_on_disk": gg.size_on_disk(),
        "layer_bits": bits,
        "runs_on_cpu_as": runs_as,  # --quantize auto (int5 runs int8 without AVX2)
        "int5_parts": sorted(gg.wide_layer_types()) if runs_as == "int4" else [],
        # an int8 run takes Q8_0 and Q6_K linears as stored with AVX2, else re-quantises them per row
        "int8_as_stored": sorted(layer_types) if runs_as == "int8" and int8_runs_take_as_stored(layer_types) else [],
        # an int4 or int5 run takes a Q6_K head as stored with AVX2, else re-quantises it (Int6Linear, int8)
        "head_as_stored": gg.head_type() if runs_as in ("int4", "int5") and gg.head_type() in Q6_TYPES else None,
    }


def types_summary(types: dict[str, dict], human) -> str:
    """'Q4_K 193 tensors 3.9 GiB, Q6_K 29 tensors 0.6 GiB, ...' for the text view."""
    return ", ".join(f"{name} {e['tensors']} tensors {human(e['bytes'])}" for name, e in types.items())
