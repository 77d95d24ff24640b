#!/usr/bin/env python3
"""Checks Whittle's packed int8 symmetric per-channel codes and scales against PyTorch.

usage: check_int8_vs_torch.py ORIGINAL.safetensors PACKED.safetensors

For every tensor the packed file's `whittle.quantization` metadata lists as uniform, 8 bits,
symmetric, per_channel:
  * scale: must equal amax(|w_row|) / 127 computed in float32 (bit-exact);
  * codes: compared with torch.quantize_per_channel(w, scales, 0, axis=0, qint8).int_repr()
    (w viewed as [rows, cols]; rows with scale 0 must hold code 0).
A differing code counts as a tie when w/scale (float64) lies within 1e-4 of a half-integer
(torch multiplies by the f32 inverse scale, so exact halves can round either way).
Exit status 0 when scales match exactly and every code difference is a ±1 tie.
"""
import json
import sys

import torch
from safetensors import safe_open


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    orig_path, packed_path = sys.argv[1:]
    with safe_open(packed_path, "pt") as packed, safe_open(orig_path, "pt") as orig:
        meta = json.loads((packed.metadata() or {})["whittle.quantization"])
        total = checked = differ = ties = bad_scales = 0
        ok = True
        for name, m in meta["tensors"].items():
            if not (m["method"] == "uniform" and m["bits"] == 8 and m["symmetric"]
                    and m["granularity"] == "per_channel"):
                continue
            w = orig.get_tensor(name).float()
            rows = w.shape[0] if w.dim() >= 2 else 1
            w = w.reshape(rows, -1)
            codes = packed.get_tensor(m["codes"]).to(torch.int16).reshape(rows, -1) - m["code_offset"]
            scales = packed.get_tensor(m["scale"]).float().reshape(rows)
            want_scales = w.abs().amax(dim=1) / 127.0
            n_bad = int((want_scales.view(torch.int32) != scales.view(torch.int32)).sum())
            bad_scales += n_bad
            live = scales > 0
            if not bool(live.all()):
                if int(codes[~live].abs().max()) != 0:
                    print(f"{name}: zero-scale rows hold non-zero codes")
                    ok = False
            wl, sl, cl = w[live], scales[live], codes[live]
            q = torch.quantize_per_channel(wl, sl.double(), torch.zeros(len(sl), dtype=torch.int64),
                                           0, torch.qint8).int_repr().to(torch.int16)
            diff = q != cl
            nd = int(diff.sum())
            nt = 0
            if nd:
                ratio = wl.double() / sl.double()[:, None]
                frac = (ratio - ratio.floor() - 0.5).abs()
                is_tie = diff & (frac < 1e-4) & ((q - cl).abs() == 1)
                nt = int(is_tie.sum())
                if nt != nd:
                    ok = False
                    idx = (diff & ~is_tie).nonzero()[:5].tolist()
                    print(f"{name}: {nd - nt} non-tie differences, e.g. at {idx}")
            total += 1
            checked += w.numel()
            differ += nd
            ties += nt
            print(f"{name:60s} {tuple(w.shape)!s:>14} scales_mismatch={n_bad} codes_differ={nd} (ties {nt})")
        ok = ok and bad_scales == 0 and total > 0
        print(json.dumps({"tensors": total, "codes_checked": checked, "scales_mismatch": bad_scales,
                          "codes_differ": differ, "differences_all_ties": differ == ties, "ok": ok}))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
