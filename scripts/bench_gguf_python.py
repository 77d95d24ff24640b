#!/usr/bin/env python3
"""Peer for benches/gguf_quantize.rs: gguf-py's numpy quantizer (gguf.quants.quantize) on the
same safetensors input, tensor by tensor, in seconds (wall and CPU) per GiB of f32 input.

    scripts/bench_gguf_python.py /tmp/whittle-gguf-bench.safetensors q8_0 [q4_0 ...]
"""
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize
import json

GIB = float(1 << 30)


def main():
    path, types = sys.argv[1], sys.argv[2:] or ["q8_0"]
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int(raw[:8].view(np.uint64)[0])
    header = {k: v for k, v in json.loads(bytes(raw[8 : 8 + n])).items() if k != "__metadata__"}
    data = raw[8 + n :]
    for t in types:
        qtype = GGMLQuantizationType[t.upper()]
        total_bytes = 0
        secs = 0.0
        cpu = 0.0
        for name, info in header.items():
            assert info["dtype"] == "F32", f"{name}: {info['dtype']} (this bench expects F32)"
            begin, end = info["data_offsets"]
            x = np.array(data[begin:end]).view(np.float32).reshape(info["shape"])
            total_bytes += x.nbytes
            start, start_cpu = time.perf_counter(), time.process_time()
            quantize(x, qtype)
            secs += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            del x
        gib = total_bytes / GIB
        print(f"{t:<6} gguf-py s/GiB {secs / gib:8.2f}  cpu s/GiB {cpu / gib:8.2f}  ({gib:.3f} GiB in {secs:.1f} s)")


if __name__ == "__main__":
    main()
