#!/usr/bin/env python3
"""Independent check of a Whittle GGUF file with llama.cpp's own Python reader (gguf-py).

    pip install gguf numpy
    scripts/check_gguf.py model.safetensors model.gguf [--report model.gguf.report.json]

Reads the GGUF with gguf.GGUFReader, dequantizes every tensor with gguf.quants.dequantize,
compares it to the float original from the safetensors file (shape, max |error|, MSE,
relative MSE, SQNR), checks the error against Whittle's own report when one is given (by
default <out.gguf>.report.json if it exists), and prints the whittle.* / general.* metadata.
Exits 1 on a missing tensor, a shape mismatch or a disagreement with the report.
"""
import argparse
import json
import os
import sys

import numpy as np
import gguf
from gguf.quants import dequantize, quantize

REFERENCE_QUANTIZERS = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}


DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def load_safetensors(path):
    """name -> float64 numpy array; a minimal reader (numpy only; BF16 widened by hand)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int(raw[:8].view(np.uint64)[0])
    header = json.loads(bytes(raw[8 : 8 + n]))
    data = raw[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        chunk = np.asarray(data[begin:end])
        if t["dtype"] == "BF16":
            values = (chunk.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] in DTYPES:
            values = chunk.view(DTYPES[t["dtype"]])
        else:
            raise SystemExit(f"{name}: dtype {t['dtype']} not handled by this checker")
        out[name] = values.astype(np.float64).reshape(t["shape"])
    return out


def field_value(field):
    """A scalar or string metadata value."""
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("safetensors")
    ap.add_argument("gguf")
    ap.add_argument("--report", help="Whittle's JSON report (list of GgufReport)")
    args = ap.parse_args()
    report_path = args.report or (args.gguf + ".report.json")
    report = {}
    if os.path.exists(report_path):
        report = {r["tensor"]: r for r in json.load(open(report_path))}

    original = load_safetensors(args.safetensors)
    reader = gguf.GGUFReader(args.gguf)
    version = field_value(reader.fields["GGUF.version"])
    from importlib.metadata import version as pkg_version
    print(f"{args.gguf}: GGUF v{version}, {len(reader.tensors)} tensors (gguf-py {pkg_version('gguf')})")
    for name, field in reader.fields.items():
        if name.startswith(("whittle.", "general.")):
            v = field_value(field)
            if isinstance(v, str) and len(v) > 100:
                v = v[:100] + "..."
            print(f"  meta {name} = {v!r}")

    failures = []
    seen = set()
    print(f"  {'tensor':<28} {'type':<6} {'shape':<16} {'max_abs_err':>12} {'mse':>11} {'rel_mse':>10} {'sqnr_db':>8}  vs report")
    for t in reader.tensors:
        seen.add(t.name)
        # gguf-py gives ne[] innermost first; the safetensors shape is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        ref = original.get(t.name)
        if ref is None:
            failures.append(f"{t.name}: not in the safetensors file")
            continue
        ref_shape = ref.shape if ref.shape != () else (1,)
        if shape != ref_shape:
            failures.append(f"{t.name}: shape {shape} in GGUF, {ref.shape} in safetensors")
            continue
        err = values - ref.reshape(shape)
        mse = float(np.mean(err**2)) if err.size else 0.0
        signal = float(np.mean(ref**2)) if ref.size else 0.0
        rel = mse / signal if signal > 0 else 0.0
        sqnr = 10 * np.log10(signal / mse) if mse > 0 and signal > 0 else float("inf")
        max_abs = float(np.max(np.abs(err))) if err.size else 0.0
        note = ""
        r = report.get(t.name)
        if r is not None:
            ok_max = abs(r["max_abs_error"] - max_abs) <= 1e-6 * max(max_abs, 1e-30) + 1e-12
            ok_mse = abs(r["mse"] - mse) <= 1e-6 * max(mse, 1e-30) + 1e-18
            ok_type = r["type"] == t.tensor_type.name.lower()
            note = "agrees" if ok_max and ok_mse and ok_type else "DIFFERS"
            if note == "DIFFERS":
                failures.append(f"{t.name}: report {r['type']} max {r['max_abs_error']} mse {r['mse']}, reader {t.tensor_type.name} max {max_abs} mse {mse}")
        print(f"  {t.name:<28} {t.tensor_type.name:<6} {str(list(shape)):<16} {max_abs:12.3e} {mse:11.3e} {rel:10.3e} {sqnr:8.2f}  {note}")
        if t.tensor_type.name in REFERENCE_QUANTIZERS:
            # gguf-py reimplements ggml's reference quantizer for these types: compare blocks.
            ours = np.asarray(t.data).reshape(-1)
            theirs = quantize(ref.reshape(shape).astype(np.float32), t.tensor_type).reshape(-1)
            block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            differ = np.any(ours.reshape(-1, block_bytes) != theirs.reshape(-1, block_bytes), axis=1)
            print(f"  {'':<28} blocks identical to gguf-py's quantizer: {differ.size - int(differ.sum())}/{differ.size}")
    for name in original:
        if name not in seen:
            r = report.get(name)
            if r is not None and r["type"] == "skipped":
                print(f"  {name:<28} skipped by Whittle: {r.get('note', '')}")
            else:
                failures.append(f"{name}: missing from the GGUF file")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("OK: every tensor present with its shape" + (", errors agree with the report" if report else ""))


if __name__ == "__main__":
    main()
