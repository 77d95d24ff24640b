//! How a `packed` tensor's codes are stored (see [`super::packed`] for the file layout):
//! bit packing, where the codes sit (dense, a bitmask, or relative indices), and entropy
//! coding of codes and index gaps; with the sizes each choice takes.

use serde::Serialize;

use crate::compress::formats::huffman;
use crate::compress::quant::{Params, Quantized};
use crate::compress::{Error, Result};

/// One tensor's sizes with fixed-width and with Huffman-coded codes and positions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EntropyReport {
    /// Codes stored (the non-zeros of a sparse tensor, else every weight).
    pub codes: u64,
    /// Bytes of the tensor's parts with fixed-width codes and index (`entropy: none`).
    pub fixed_bytes: u64,
    /// Bytes with Huffman coding (what was stored).
    pub huffman_bytes: u64,
    /// Bits per stored code, fixed width and Huffman-coded (its length table included).
    pub code_bits_fixed: f64,
    /// See `code_bits_fixed`.
    pub code_bits_huffman: f64,
    /// Bits per stored code spent locating the codes (mask or index; 0 when dense), fixed
    /// and Huffman-coded.
    pub index_bits_fixed: f64,
    /// See `index_bits_fixed`.
    pub index_bits_huffman: f64,
}

impl EntropyReport {
    /// `huffman` beside what fixed-width codes at the `fixed` positions (the pick of
    /// [`Positions::choose`]) take for the same `numel` weights and parameters.
    pub(super) fn of(fixed: Positions, numel: usize, huffman: &Encoded) -> EntropyReport {
        let per = |bytes: usize, n: usize| bytes as f64 * 8.0 / n.max(1) as f64;
        let stored = fixed.codes(numel);
        let code_bytes = (stored * huffman.params.bits as usize).div_ceil(8);
        let position_bytes = fixed.bytes(numel);
        EntropyReport {
            codes: huffman.stored as u64,
            fixed_bytes: (code_bytes + position_bytes + huffman.param_bytes()) as u64,
            huffman_bytes: huffman.bytes() as u64,
            code_bits_fixed: per(code_bytes, stored),
            code_bits_huffman: per(
                huffman.codes.len() + huffman.code_lengths.len(),
                huffman.stored,
            ),
            index_bits_fixed: per(position_bytes, stored),
            index_bits_huffman: per(
                huffman.positions.len() + huffman.index_lengths.len(),
                huffman.stored,
            ),
        }
    }
}

/// Packs codes of `bits` (1..=8) bits LSB-first; see the module documentation.
pub fn pack_bits(codes: &[u8], bits: u8) -> Vec<u8> {
    if bits >= 8 {
        return codes.to_vec();
    }
    let bits = u32::from(bits.max(1));
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity((codes.len() * bits as usize).div_ceil(8));
    let (mut acc, mut filled) = (0u32, 0u32);
    for &c in codes {
        acc |= (u32::from(c) & mask) << filled;
        filled += bits;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpacks `n` codes of `bits` bits from `bytes` (the inverse of [`pack_bits`]). Refuses a
/// byte count other than ⌈n · bits / 8⌉.
pub fn unpack_bits(bytes: &[u8], bits: u8, n: usize) -> Result<Vec<u8>> {
    if !(1..=8).contains(&bits) {
        return Err(Error::InvalidSafetensors(format!(
            "packed codes of {bits} bits (1 to 8 expected)"
        )));
    }
    let need = n
        .checked_mul(bits as usize)
        .map(|b| b.div_ceil(8))
        .ok_or_else(|| Error::InvalidSafetensors(format!("{n} codes overflow")))?;
    if bytes.len() != need {
        return Err(Error::InvalidSafetensors(format!(
            "{} bytes of packed codes, expected {need} for {n} codes of {bits} bits",
            bytes.len()
        )));
    }
    if bits == 8 {
        return Ok(bytes.to_vec());
    }
    let bits = u32::from(bits);
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(n);
    let (mut acc, mut filled) = (0u32, 0u32);
    let mut it = bytes.iter();
    while out.len() < n {
        if filled < bits {
            acc |= u32::from(it.next().copied().unwrap_or(0)) << filled;
            filled += 8;
        }
        while filled >= bits && out.len() < n {
            out.push((acc & mask) as u8);
            acc >>= bits;
            filled -= bits;
        }
    }
    Ok(out)
}

/// A selected tensor's stored parts (everything after the header is decided).
pub(super) struct Encoded {
    /// The codes stream: bit-packed or Huffman-coded.
    pub(super) codes: Vec<u8>,
    /// Huffman code lengths of the codes (empty without entropy coding).
    pub(super) code_lengths: Vec<u8>,
    /// Mask or index bytes (empty for dense codes).
    pub(super) positions: Vec<u8>,
    /// Huffman code lengths of the index gaps (empty unless the index is Huffman-coded).
    pub(super) index_lengths: Vec<u8>,
    /// Where the codes sit.
    pub(super) layout: Positions,
    /// Codes stored.
    pub(super) stored: usize,
    /// Scales, zero-points and codebook.
    pub(super) params: Params,
}

impl Encoded {
    /// Bytes stored for the tensor: every part above.
    pub(super) fn bytes(&self) -> usize {
        self.codes.len()
            + self.code_lengths.len()
            + self.positions.len()
            + self.index_lengths.len()
            + self.param_bytes()
    }

    /// Bytes of the scales (f32), zero-points (u8) and codebook (f32).
    fn param_bytes(&self) -> usize {
        4 * self.params.scales.len()
            + self.params.zero_points.len()
            + 4 * self.params.codebook.len()
    }

    /// Fixed-width codes at the positions chosen before quantizing.
    pub(super) fn fixed(values: &[f32], q: Quantized, positions: Positions) -> Encoded {
        let Quantized { codes, params, .. } = q;
        let kept = match positions {
            Positions::Dense => codes,
            _ => nonzero_codes(values, &codes),
        };
        Encoded {
            codes: pack_bits(&kept, params.bits),
            code_lengths: Vec::new(),
            positions: positions.encode(values),
            index_lengths: Vec::new(),
            layout: positions,
            stored: kept.len(),
            params,
        }
    }

    /// Huffman-coded codes (and index gaps): every way of locating the codes is sized with
    /// entropy coding and the smallest is kept (dense on ties, then the mask, then the
    /// shortest index entries).
    pub(super) fn huffman(values: &[f32], q: Quantized) -> Encoded {
        let Quantized { codes, params, .. } = q;
        let alphabet = 1usize << params.bits;
        // Code lengths for `symbols` of an `alphabet`, and the bytes of stream plus table.
        let coded = |symbols: &[u8], alphabet: usize| -> (Vec<u8>, usize) {
            let mut counts = huffman::histogram(symbols);
            counts.truncate(alphabet);
            let lengths = huffman::code_lengths(&counts);
            let bytes = huffman::encoded_bits(&counts, &lengths).div_ceil(8) as usize;
            (lengths, bytes + alphabet)
        };
        let numel = values.len();
        let nonzero = values.iter().filter(|v| **v != 0.0).count();
        let (dense_lengths, dense_size) = coded(&codes, alphabet);
        let mut best = (dense_size, Positions::Dense, None);
        // The non-zeros' codes and their lengths: the same for the mask and every index.
        let mut sparse = None;
        if nonzero < numel {
            let kept = nonzero_codes(values, &codes);
            let (kept_lengths, kept_size) = coded(&kept, alphabet);
            let mask = Positions::Mask { nonzero };
            if kept_size + mask.bytes(numel) < best.0 {
                best = (kept_size + mask.bytes(numel), mask, None);
            }
            for bits in 1..=8u8 {
                let gaps = index_gaps(values, bits);
                let (lengths, size) = coded(&gaps, 1 << bits);
                let index = Positions::Index {
                    nonzero,
                    bits,
                    entries: gaps.len(),
                };
                if kept_size + size < best.0 {
                    best = (kept_size + size, index, Some((gaps, lengths)));
                }
            }
            sparse = Some((kept, kept_lengths));
        }
        let layout = best.1;
        let (kept, code_lengths) = match (layout, sparse) {
            (Positions::Dense, _) | (_, None) => (codes, dense_lengths),
            (_, Some(s)) => s,
        };
        let (positions, index_lengths) = match (layout, best.2) {
            (Positions::Index { .. }, Some((gaps, lengths))) => {
                (huffman::encode(&gaps, &lengths), lengths)
            }
            _ => (layout.encode(values), Vec::new()),
        };
        Encoded {
            codes: huffman::encode(&kept, &code_lengths),
            code_lengths,
            positions,
            index_lengths,
            layout,
            stored: kept.len(),
            params,
        }
    }
}

/// The codes of the non-zero weights, in index order.
fn nonzero_codes(values: &[f32], codes: &[u8]) -> Vec<u8> {
    let kept = values.iter().zip(codes).filter(|(v, _)| **v != 0.0);
    kept.map(|(_, c)| *c).collect()
}

/// Where a tensor's codes sit: at every position, or only at its non-zeros, located by a
/// bitmask or by relative indices (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Positions {
    Dense,
    Mask {
        nonzero: usize,
    },
    Index {
        nonzero: usize,
        bits: u8,
        entries: usize,
    },
}

impl Positions {
    /// The smallest encoding for `values` quantized to `code_bits` bits (one pass).
    pub(super) fn choose(values: &[f32], code_bits: u8) -> Positions {
        let numel = values.len();
        let nonzero = values.iter().filter(|v| **v != 0.0).count();
        // Leaving out the zeros' codes saves (numel − nonzero) · bits bits; locating the
        // non-zeros costs at least one bit each (mask or index), so a dense tensor (the
        // usual case) needs no further pass.
        if (numel - nonzero) * code_bits as usize <= nonzero {
            return Positions::Dense;
        }
        // Filler entries a relative index of 1..=8 bits needs.
        let mut fillers = [0usize; 8];
        let mut next = 0usize;
        for (j, v) in values.iter().enumerate() {
            if *v != 0.0 {
                let gap = j - next;
                if gap > 0 {
                    for (b, f) in fillers.iter_mut().enumerate() {
                        *f += gap / ((1usize << (b + 1)) - 1);
                    }
                }
                next = j + 1;
            }
        }
        let codes = |n: usize| (n * code_bits as usize).div_ceil(8);
        let mut best = (codes(numel), Positions::Dense);
        let mask = Positions::Mask { nonzero };
        let candidates = std::iter::once(mask).chain((1..=8u8).map(|bits| Positions::Index {
            nonzero,
            bits,
            entries: nonzero + fillers[bits as usize - 1],
        }));
        for p in candidates {
            let size = codes(nonzero) + p.bytes(numel);
            if size < best.0 {
                best = (size, p);
            }
        }
        best.1
    }

    /// Codes stored for a tensor of `numel` weights.
    pub(super) fn codes(&self, numel: usize) -> usize {
        match *self {
            Positions::Dense => numel,
            Positions::Mask { nonzero } | Positions::Index { nonzero, .. } => nonzero,
        }
    }

    /// Bytes of the mask or index.
    pub(super) fn bytes(&self, numel: usize) -> usize {
        match *self {
            Positions::Dense => 0,
            Positions::Mask { .. } => numel.div_ceil(8),
            Positions::Index { bits, entries, .. } => (entries * bits as usize).div_ceil(8),
        }
    }

    /// The mask or index bytes of `values` (empty for `Dense`).
    pub(super) fn encode(&self, values: &[f32]) -> Vec<u8> {
        match *self {
            Positions::Dense => Vec::new(),
            Positions::Mask { .. } => {
                let mut mask = vec![0u8; values.len().div_ceil(8)];
                for (j, v) in values.iter().enumerate() {
                    if *v != 0.0 {
                        mask[j / 8] |= 1 << (j % 8);
                    }
                }
                mask
            }
            Positions::Index { bits, entries, .. } => {
                let gaps = index_gaps(values, bits);
                debug_assert_eq!(gaps.len(), entries);
                pack_bits(&gaps, bits)
            }
        }
    }
}

/// The relative-index entries of `bits` bits locating the non-zeros of `values` (see the
/// module documentation), one per byte.
fn index_gaps(values: &[f32], bits: u8) -> Vec<u8> {
    let full = (1usize << bits) - 1;
    let mut gaps = Vec::new();
    let mut next = 0;
    for (j, v) in values.iter().enumerate() {
        if *v != 0.0 {
            let mut gap = j - next;
            while gap >= full {
                gaps.push(full as u8);
                gap -= full;
            }
            gaps.push(gap as u8);
            next = j + 1;
        }
    }
    gaps
}

/// Which of `numel` positions hold codes, from a relative index (see the module
/// documentation); refuses entries that run past the tensor or place other than `nonzero`
/// codes.
pub(super) fn index_positions(
    gaps: Vec<u8>,
    bits: u8,
    nonzero: usize,
    numel: usize,
) -> std::result::Result<Vec<bool>, String> {
    let full = (1usize << bits) - 1;
    let mut present = vec![false; numel];
    let (mut p, mut placed) = (0usize, 0usize);
    for g in gaps {
        let g = g as usize;
        p += g;
        if g == full {
            continue;
        }
        if p >= numel {
            return Err(format!("relative index runs past the {numel} weights"));
        }
        present[p] = true;
        placed += 1;
        p += 1;
    }
    if placed != nonzero {
        return Err(format!(
            "relative index places {placed} weights, metadata says {nonzero}"
        ));
    }
    Ok(present)
}
