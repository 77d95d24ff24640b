#!/usr/bin/env python3
"""Helpers of scripts/bench_llama_quantize.sh (needs `pip install gguf numpy`).

  bench_llama_quantize.py input IN.safetensors OUT.gguf
      The same f32 weights as an F32 GGUF that llama-quantize accepts: a "llama" model with
      one ffn_up tensor per block and the hyper-parameters llama.cpp's loader asks for.
  bench_llama_quantize.py compare IN.safetensors OURS.gguf THEIRS.gguf [TENSORS]
      Per tensor (the first TENSORS, default 4, in file order): whether the quantized bytes are
      identical, and each file's RMSE against the f32 source after gguf-py's dequantization.
"""
import json
import sys

import numpy as np
import gguf
from gguf.quants import dequantize


def safetensors(path):
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int(raw[:8].view(np.uint64)[0])
    header = {k: v for k, v in json.loads(bytes(raw[8:8 + n])).items() if k != "__metadata__"}
    data = raw[8 + n:]
    out = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        assert info["dtype"] == "F32", f"{name}: {info['dtype']}"
        b, e = info["data_offsets"]
        out.append((name, data[b:e].view(np.float32).reshape(info["shape"])))
    return out


def make_input(src, dst):
    tensors = safetensors(src)
    rows, cols = tensors[0][1].shape
    w = gguf.GGUFWriter(dst, "llama")
    w.add_context_length(cols)
    w.add_embedding_length(cols)
    w.add_block_count(len(tensors))
    w.add_feed_forward_length(rows)
    w.add_head_count(32)
    w.add_head_count_kv(32)
    w.add_rope_dimension_count(cols // 32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for i, (_, t) in enumerate(tensors):
        w.add_tensor(f"blk.{i}.ffn_up.weight", t, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def compare(src, ours, theirs, limit):
    source = safetensors(src)
    a = [t for t in gguf.GGUFReader(ours).tensors]
    b = [t for t in gguf.GGUFReader(theirs).tensors]
    results = []
    for k in range(min(limit, len(source))):
        ta, tb = a[k], b[k]
        x = np.asarray(source[k][1], dtype=np.float32)
        row = {"tensor": k, "ours": ta.tensor_type.name, "theirs": tb.tensor_type.name,
               "bytes_identical": bool(ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data))}
        for label, t in (("ours", ta), ("theirs", tb)):
            d = dequantize(t.data, t.tensor_type).reshape(x.shape)
            row[f"rmse_{label}"] = float(np.sqrt(np.mean((d - x) ** 2, dtype=np.float64)))
        results.append(row)
    print(json.dumps({"source_rms": float(np.sqrt(np.mean(np.asarray(source[0][1]) ** 2, dtype=np.float64))),
                      "tensors": results}))


def main():
    cmd = sys.argv[1]
    if cmd == "input":
        make_input(sys.argv[2], sys.argv[3])
    elif cmd == "compare":
        compare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 4)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
