//! Safetensors in and out, written by hand.
//!
//! This module owns the safetensors format: strict header parsing ([`parse_header`],
//! [`read_header`]), read-only memory-mapped access to tensor bytes ([`SafetensorsFile`])
//! with dtype conversion, and a streaming writer ([`write_safetensors`]) that emits one
//! tensor at a time so a whole model never has to sit in memory.
//!
//! Validation is stricter than the reference `safetensors` crate: duplicate keys anywhere
//! in the header, unknown fields, non-string metadata, overlapping tensors, holes and
//! trailing bytes are all refused with a message a user can act on. It must not know
//! where files come from (HTTP, blob store): it sees bytes and paths only.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::compress::{json_kind, Error, Result};

/// A named f32 tensor on the host: what models load from and export to.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The state_dict name (`fc1.weight`).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Largest header accepted, in bytes (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// A safetensors element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// `BOOL`: one byte, 0 or 1.
    Bool,
    /// `U8`.
    U8,
    /// `I8`.
    I8,
    /// `I16`.
    I16,
    /// `U16`.
    U16,
    /// `F16`: IEEE 754 half precision.
    F16,
    /// `BF16`: bfloat16.
    BF16,
    /// `I32`.
    I32,
    /// `U32`.
    U32,
    /// `F32`.
    F32,
    /// `F64`.
    F64,
    /// `I64`.
    I64,
    /// `U64`.
    U64,
    /// `F8_E4M3`: 8-bit float, 4 exponent bits, 3 mantissa bits (the "fn" variant: no infinities).
    F8E4M3,
    /// `F8_E5M2`: 8-bit float, 5 exponent bits, 2 mantissa bits (the top byte of an F16).
    F8E5M2,
}

impl Dtype {
    /// Every dtype, in the order of the safetensors specification.
    pub const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
    ];

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The spelling used in safetensors headers (`"F32"`, `"F8_E4M3"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    /// Whether this is a floating-point type (F8, F16, BF16, F32, F64).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8E4M3 | Dtype::F8E5M2
        )
    }

    /// Whether this is an integer type (BOOL excluded).
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            Dtype::U8
                | Dtype::I8
                | Dtype::I16
                | Dtype::U16
                | Dtype::I32
                | Dtype::U32
                | Dtype::I64
                | Dtype::U64
        )
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown dtype name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?} (expected one of BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2)")]
pub struct UnknownDtype(pub String);

impl FromStr for Dtype {
    type Err = UnknownDtype;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDtype(s.to_owned()))
    }
}

impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Dtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorInfo {
    /// The tensor's name (e.g. `fc1.weight`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape; empty for a scalar.
    pub shape: Vec<usize>,
    /// `[begin, end)` byte offsets relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Number of elements (1 for a scalar). Parsed headers guarantee this does not overflow;
    /// it saturates for hand-built infos that would.
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// Number of bytes of data (`end - begin`).
    pub fn nbytes(&self) -> usize {
        self.data_offsets.1.saturating_sub(self.data_offsets.0)
    }
}

/// A parsed, validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors in file order (sorted by begin offset).
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` string map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Absolute offset of the data section: `8 + header_len`.
    pub data_start: usize,
}

impl Header {
    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Size of the data section in bytes.
    pub fn data_len(&self) -> usize {
        self.tensors.last().map_or(0, |t| t.data_offsets.1)
    }

    /// Total number of elements over all tensors.
    pub fn total_numel(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel() as u64).sum()
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidSafetensors(msg.into())
}

/// Reads the header length from the first 8 bytes and checks it against the file size.
fn header_len(prefix: &[u8], file_len: u64) -> Result<usize> {
    if file_len < 8 {
        return Err(invalid(format!(
            "the file is {file_len} bytes long; a safetensors file starts with an 8-byte header length"
        )));
    }
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(invalid("the 8-byte header length is truncated"));
    };
    let mut buf = [0u8; 8];
    buf.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(buf);
    if n > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "the header length is {n} bytes, more than the {MAX_HEADER_LEN}-byte limit (is this a safetensors file?)"
        )));
    }
    if n > file_len - 8 {
        return Err(invalid(format!(
            "the header length is {n} bytes but only {} bytes follow the length field (is the file truncated?)",
            file_len - 8
        )));
    }
    // n <= 100 MB, so it fits usize on every supported target.
    usize::try_from(n).map_err(|_| invalid("header length does not fit in memory"))
}

/// Parses and validates a safetensors header.
///
/// `prefix` holds at least the first `8 + header_len` bytes of the file (the whole file is
/// fine); `file_len` is the length of the whole file, used to check that the tensors cover
/// the data section exactly.
pub fn parse_header(prefix: &[u8], file_len: u64) -> Result<Header> {
    let n = header_len(prefix, file_len)?;
    let data_start = 8 + n;
    let Some(json_bytes) = prefix.get(8..data_start) else {
        return Err(invalid(format!(
            "the header is truncated: expected {n} bytes, got {}",
            prefix.len().saturating_sub(8)
        )));
    };
    let json = std::str::from_utf8(json_bytes).map_err(|e| {
        invalid(format!(
            "the header is not valid UTF-8 (byte {} of the header)",
            e.valid_up_to()
        ))
    })?;
    let value = parse_strict_json(json)?;
    let Value::Object(entries) = value else {
        return Err(invalid(format!(
            "the header must be a JSON object, found {}",
            json_kind(&value)
        )));
    };
    // file_len - data_start cannot underflow: header_len checked n <= file_len - 8.
    let data_len = file_len - data_start as u64;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == "__metadata__" {
            metadata = parse_metadata(entry)?;
        } else {
            tensors.push(parse_tensor_entry(name, &entry, data_len)?);
        }
    }
    tensors.sort_by(|a, b| {
        a.data_offsets
            .cmp(&b.data_offsets)
            .then_with(|| a.name.cmp(&b.name))
    });
    check_coverage(&tensors, data_len)?;
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// Reads and validates the header of the safetensors file at `path` (the tensor data is
/// mapped, not read).
pub fn read_header(path: impl AsRef<Path>) -> Result<Header> {
    Ok(SafetensorsFile::open(path)?.header)
}

/// The `safetensors` crate's own validation of a whole file (header, dtypes, offsets, the
/// data section's length), on top of ours: ours refuses what it accepts silently (duplicate
/// names, which its map keeps the last of) and names the offending tensor; it is the
/// reference reader users load our files with.
fn reference_check(bytes: &[u8]) -> Result<()> {
    safetensors::SafeTensors::read_metadata(bytes)
        .map(|_| ())
        .map_err(|e| invalid(format!("the safetensors reader refuses the file: {e}")))
}

/// Parses JSON into a `Value`, refusing duplicate keys at any depth (serde_json's own
/// `Value` silently keeps the last one, which would let two tensors share a name).
fn parse_strict_json(json: &str) -> Result<Value> {
    let mut de = serde_json::Deserializer::from_str(json);
    let parsed = StrictSeed { depth: 0 }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => invalid(format!("the header {e}")),
        _ => invalid(format!("the header is not valid JSON: {e}")),
    })
}

struct StrictSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for StrictSeed {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor { depth: self.depth })
    }
}

struct StrictVisitor {
    depth: usize,
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictSeed {
            depth: self.depth + 1,
        })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut obj = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                let what = if self.depth == 0 && key != "__metadata__" {
                    "tensor name"
                } else {
                    "key"
                };
                return Err(serde::de::Error::custom(format!(
                    "has a duplicate {what} {key:?}"
                )));
            }
            let v = map.next_value_seed(StrictSeed {
                depth: self.depth + 1,
            })?;
            obj.insert(key, v);
        }
        Ok(Value::Object(obj))
    }
}

fn parse_metadata(entry: Value) -> Result<BTreeMap<String, String>> {
    let Value::Object(map) = entry else {
        return Err(invalid(format!(
            "__metadata__ must be an object of strings, found {}",
            json_kind(&entry)
        )));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(invalid(format!(
                "__metadata__ value for key {k:?} must be a string, found {} (encode structured values as a JSON string)",
                json_kind(&other)
            ))),
        })
        .collect()
}

fn parse_tensor_entry(name: String, entry: &Value, data_len: u64) -> Result<TensorInfo> {
    let Value::Object(fields) = entry else {
        return Err(invalid(format!(
            "tensor {name:?}: expected an object with dtype, shape and data_offsets, found {}",
            json_kind(entry)
        )));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(invalid(format!(
            "tensor {name:?}: unknown field {unknown:?} (expected dtype, shape, data_offsets)"
        )));
    }
    let field = |key: &str| {
        fields
            .get(key)
            .ok_or_else(|| invalid(format!("tensor {name:?}: missing field {key:?}")))
    };

    let dtype = match field("dtype")? {
        Value::String(s) => s
            .parse::<Dtype>()
            .map_err(|e| invalid(format!("tensor {name:?}: {e}")))?,
        other => {
            return Err(invalid(format!(
                "tensor {name:?}: dtype must be a string, found {}",
                json_kind(other)
            )))
        }
    };

    let Value::Array(dims) = field("shape")? else {
        return Err(invalid(format!(
            "tensor {name:?}: shape must be an array of non-negative integers"
        )));
    };
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims {
        let dim = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "tensor {name:?}: shape must be an array of non-negative integers, found {d}"
                ))
            })?;
        shape.push(dim);
    }

    let offsets = match field("data_offsets")? {
        Value::Array(o) if o.len() == 2 => o.iter().map(Value::as_u64).collect::<Option<Vec<_>>>(),
        _ => None,
    };
    let Some(&[begin, end]) = offsets.as_deref() else {
        return Err(invalid(format!(
            "tensor {name:?}: data_offsets must be an array of two non-negative integers [begin, end]"
        )));
    };

    let nbytes = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|numel| numel.checked_mul(dtype.size_in_bytes() as u64))
        .ok_or_else(|| {
            invalid(format!(
                "tensor {name:?}: shape {shape:?} has more elements than can be addressed"
            ))
        })?;
    if end < begin {
        return Err(invalid(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] end before they begin"
        )));
    }
    if end - begin != nbytes {
        return Err(invalid(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] span {} bytes, but shape {shape:?} of {dtype} needs {nbytes} bytes",
            end - begin
        )));
    }
    if end > data_len {
        return Err(invalid(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes)"
        )));
    }
    // end <= data_len <= file_len, which is addressable because the caller has the bytes
    // (or their length from the filesystem); still convert without casting blindly.
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| invalid("offsets do not fit in memory"));
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        data_offsets: (to_usize(begin)?, to_usize(end)?),
    })
}

/// Checks that tensors (sorted by offsets) tile `[0, data_len)` exactly.
fn check_coverage(tensors: &[TensorInfo], data_len: u64) -> Result<()> {
    let mut expected: usize = 0;
    let mut previous: Option<&TensorInfo> = None;
    for t in tensors {
        let (begin, end) = t.data_offsets;
        if begin < expected {
            let prev = previous.map_or("", |p| p.name.as_str());
            return Err(invalid(format!(
                "tensors {prev:?} and {:?} overlap (byte {begin} is used by both)",
                t.name
            )));
        }
        if begin > expected {
            return Err(invalid(format!(
                "bytes {expected}..{begin} of the data section belong to no tensor (a hole before {:?})",
                t.name
            )));
        }
        expected = end;
        previous = Some(t);
    }
    if (expected as u64) < data_len {
        return Err(invalid(format!(
            "the data section is {data_len} bytes but the tensors cover only {expected}: {} trailing bytes",
            data_len - expected as u64
        )));
    }
    Ok(())
}

/// A safetensors file opened read-only through a memory map.
pub struct SafetensorsFile {
    header: Header,
    mmap: memmap2::Mmap,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("header", &self.header)
            .field("len", &self.mmap.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Opens and validates the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        if file_len < 8 {
            // Refuse before mapping: an empty file cannot be mapped on every platform.
            return Err(invalid(format!(
                "the file is {file_len} bytes long; a safetensors file starts with an 8-byte header length"
            )));
        }
        // SAFETY: the file is an immutable, content-addressed blob that Whittle owns: it is
        // written under a temporary name and renamed into place, never modified afterwards,
        // so the mapped bytes cannot change (or shrink) while this map is alive.
        let mmap = unsafe { memmap2::Mmap::map(&file)? };
        let header = parse_header(&mmap, mmap.len() as u64)?;
        reference_check(&mmap)?;
        Ok(SafetensorsFile { header, mmap })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.header.get(name)
    }

    /// Drops the mapped pages of a tensor's bytes from the process's resident memory, once
    /// they have been copied out (a network's weights): they stay in the page cache and are
    /// read again from the file if touched later. Best effort; errors are ignored.
    pub fn release(&self, info: &TensorInfo) {
        let begin = self.header.data_start.saturating_add(info.data_offsets.0);
        let end = self.header.data_start.saturating_add(info.data_offsets.1);
        if begin < end && end <= self.mmap.len() {
            // SAFETY: the map is a read-only, shared mapping of an immutable file: dropping
            // its pages only makes the next read fault them in again from the same bytes.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    begin,
                    end - begin,
                )
            };
        }
    }

    /// [`SafetensorsFile::release`] for every tensor.
    pub fn release_all(&self) {
        for t in &self.header.tensors {
            self.release(t);
        }
    }

    /// Raw little-endian bytes of a tensor. `info` must come from this file's header; an
    /// info that does not fit the file yields an empty slice.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let begin = self.header.data_start.saturating_add(info.data_offsets.0);
        let end = self.header.data_start.saturating_add(info.data_offsets.1);
        self.mmap.get(begin..end).unwrap_or(&[])
    }

    /// The tensor's elements converted to `f32` (F8, F16, BF16, F32 or F64).
    pub fn to_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        decode_f32(&info.name, info.dtype, self.bytes(info))
    }

    /// The tensor's elements converted to `i64` (BOOL or any integer dtype; U64 values
    /// above `i64::MAX` are refused).
    pub fn to_i64(&self, info: &TensorInfo) -> Result<Vec<i64>> {
        decode_i64(&info.name, info.dtype, self.bytes(info))
    }

    /// Every floating-point tensor as f32, in file order.
    pub fn float_tensors(&self) -> Result<Vec<NamedTensor>> {
        self.header
            .tensors
            .iter()
            .filter(|t| t.dtype.is_float())
            .map(|t| {
                Ok(NamedTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values: self.to_f32(t)?,
                })
            })
            .collect()
    }

    /// One pass over the floating-point tensors: elements, non-zero elements, bytes.
    pub fn weight_summary(&self) -> WeightSummary {
        let mut s = WeightSummary::default();
        for t in self.header.tensors.iter().filter(|t| t.dtype.is_float()) {
            let width = t.dtype.size_in_bytes();
            // A float is zero when every bit but the sign bit (top bit of the last byte,
            // little-endian) is zero, so -0.0 counts as zero too.
            s.nonzero += self
                .bytes(t)
                .chunks_exact(width)
                .filter(|e| {
                    let last = e.len() - 1;
                    e[..last].iter().any(|&b| b != 0) || e[last] & 0x7f != 0
                })
                .count() as u64;
            s.parameters += t.numel() as u64;
            s.float_bytes += t.nbytes() as u64;
        }
        s
    }
}

pub use super::tensor_codec::{
    decode_f32, decode_i64, encode_as, encode_f32, encode_i64, f32_view,
};

/// A tensor to be written: its data comes later, from the writer's `fill` callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape; empty for a scalar.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Builds a spec.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Bytes of data this tensor takes, or `None` on overflow.
    pub fn nbytes(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
    }
}

/// A writer that counts the bytes that pass through it.
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Renders the header JSON for `specs` (offsets contiguous, in the given order), padded
/// with spaces to a multiple of 8 bytes like the reference implementation.
fn render_header(metadata: &BTreeMap<String, String>, specs: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut json = String::from("{");
    if !metadata.is_empty() {
        let map = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json.push_str("\"__metadata__\":");
        json.push_str(&Value::Object(map).to_string());
    }
    let mut offset: usize = 0;
    for spec in specs {
        if spec.name == "__metadata__" || !seen.insert(spec.name.as_str()) {
            return Err(invalid(format!(
                "refusing to write tensor name {:?} twice or as a reserved key",
                spec.name
            )));
        }
        let end = spec
            .nbytes()
            .and_then(|n| offset.checked_add(n))
            .ok_or_else(|| {
                invalid(format!(
                    "tensor {:?}: shape {:?} is too large to write",
                    spec.name, spec.shape
                ))
            })?;
        if json.len() > 1 {
            json.push(',');
        }
        json.push_str(&Value::String(spec.name.clone()).to_string());
        json.push_str(":{\"dtype\":\"");
        json.push_str(spec.dtype.as_str());
        json.push_str("\",\"shape\":");
        json.push_str(&Value::from(spec.shape.clone()).to_string());
        json.push_str(&format!(",\"data_offsets\":[{offset},{end}]}}"));
        offset = end;
    }
    json.push('}');
    let mut bytes = json.into_bytes();
    let padded = bytes.len().div_ceil(8) * 8;
    bytes.resize(padded, b' ');
    if bytes.len() as u64 > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "the header would be {} bytes, more than the {MAX_HEADER_LEN}-byte limit",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Streams a safetensors file to `w`.
///
/// The header lists `specs` in the given order with contiguous offsets (and
/// `__metadata__` when `metadata` is not empty). Then `fill(i, w)` is called once per
/// spec, in order, and must write exactly that tensor's bytes (little-endian); writing
/// more or fewer is an error. Returns the total number of bytes written. `w` is written
/// in many small pieces: give it a `BufWriter` when it is a file.
pub fn write_safetensors<W: Write>(
    w: W,
    metadata: &BTreeMap<String, String>,
    specs: &[TensorSpec],
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<u64> {
    let header = render_header(metadata, specs)?;
    let mut out = CountingWriter { inner: w, count: 0 };
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (i, spec) in specs.iter().enumerate() {
        let before = out.count;
        fill(i, &mut out)?;
        let written = out.count - before;
        // render_header checked that nbytes does not overflow.
        let expected = spec.nbytes().unwrap_or(usize::MAX) as u64;
        if written != expected {
            return Err(Error::Internal(format!(
                "tensor {:?}: wrote {written} bytes, expected {expected} ({} {:?})",
                spec.name, spec.dtype, spec.shape
            )));
        }
    }
    out.flush()?;
    Ok(out.count)
}

/// Element and size counts of a model's floating-point tensors.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WeightSummary {
    /// Elements.
    pub parameters: u64,
    /// Non-zero elements (`-0.0` counts as zero).
    pub nonzero: u64,
    /// Bytes of their data.
    pub float_bytes: u64,
}

impl WeightSummary {
    /// Bits of storage per element (0 for no elements).
    pub fn bits_per_weight(&self) -> f64 {
        if self.parameters == 0 {
            0.0
        } else {
            self.float_bytes as f64 * 8.0 / self.parameters as f64
        }
    }
}

/// Bytes of the data of f32 `tensors` (what a file holds besides its header).
pub fn tensor_bytes(tensors: &[NamedTensor]) -> u64 {
    tensors.iter().map(|w| w.values.len() as u64 * 4).sum()
}

/// Writes f32 tensors as a safetensors file; returns the bytes written.
pub fn write_f32(
    out: &mut dyn Write,
    metadata: &BTreeMap<String, String>,
    tensors: &[NamedTensor],
) -> Result<u64> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|w| TensorSpec::new(w.name.clone(), Dtype::F32, w.shape.clone()))
        .collect();
    write_safetensors(out, metadata, &specs, |i, w| {
        w.write_all(&encode_f32(&tensors[i].values))?;
        Ok(())
    })
}

/// Copies `input` with new metadata, replacing the values of the tensors named in
/// `replacements` (f32, re-encoded in each tensor's own dtype); returns the bytes written.
pub fn write_replacing(
    input: &SafetensorsFile,
    replacements: &std::collections::HashMap<String, Vec<f32>>,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
) -> Result<u64> {
    let infos = &input.header().tensors;
    let specs: Vec<TensorSpec> = infos
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    write_safetensors(out, metadata, &specs, |i, w| {
        let t = &infos[i];
        match replacements.get(&t.name) {
            Some(v) => w.write_all(&encode_as(t.dtype, v)?)?,
            None => w.write_all(input.bytes(t))?,
        }
        Ok(())
    })
}

/// Serializes small in-memory tensors (spec plus little-endian bytes) to a complete
/// safetensors file.
pub fn serialize(
    metadata: &BTreeMap<String, String>,
    tensors: &[(TensorSpec, &[u8])],
) -> Result<Vec<u8>> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut out = Vec::new();
    write_safetensors(&mut out, metadata, &specs, |i, w| {
        w.write_all(tensors[i].1)?;
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a file from a raw header string and a data section.
    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        parse_header(bytes, bytes.len() as u64)
    }

    fn err(bytes: &[u8]) -> String {
        match parse(bytes) {
            Err(Error::InvalidSafetensors(m)) => m,
            other => panic!("expected InvalidSafetensors, got {other:?}"),
        }
    }

    fn sample_specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("fc1.weight", Dtype::F32, vec![3, 2]),
            TensorSpec::new("fc1.bias", Dtype::F32, vec![3]),
            TensorSpec::new("half", Dtype::F16, vec![2]),
            TensorSpec::new("steps", Dtype::I64, vec![]),
            TensorSpec::new("mask", Dtype::U8, vec![5]),
        ]
    }

    fn sample_bytes() -> Vec<u8> {
        let w = [0.5f32, -1.0, 2.0, 3.25, -0.125, 7.0];
        let b = [1.0f32, 2.0, 3.0];
        let h = [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_owned(), "pt".to_owned());
        meta.insert("whittle.architecture".to_owned(), "{\"a\":1}".to_owned());
        let tensors: Vec<Vec<u8>> = vec![
            encode_f32(&w),
            encode_f32(&b),
            h.iter().flat_map(|v| v.to_le_bytes()).collect(),
            encode_i64(&[42]),
            vec![1, 2, 3, 4, 5],
        ];
        let specs = sample_specs();
        let pairs: Vec<(TensorSpec, &[u8])> = specs
            .into_iter()
            .zip(tensors.iter().map(Vec::as_slice))
            .collect();
        serialize(&meta, &pairs).unwrap()
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(d.as_str().parse::<Dtype>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.as_str()));
            assert_eq!(serde_json::from_str::<Dtype>(&json).unwrap(), d);
        }
        assert!("F128".parse::<Dtype>().is_err());
        assert_eq!(Dtype::BF16.size_in_bytes(), 2);
        assert_eq!(Dtype::F8E4M3.as_str(), "F8_E4M3");
        assert!(Dtype::F8E5M2.is_float() && !Dtype::I64.is_float());
    }

    #[test]
    fn written_file_is_read_by_the_reference_crate() {
        let bytes = sample_bytes();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("fc1.weight").unwrap();
        assert_eq!(w.dtype(), safetensors::Dtype::F32);
        assert_eq!(w.shape(), &[3, 2]);
        assert_eq!(
            w.data(),
            encode_f32(&[0.5, -1.0, 2.0, 3.25, -0.125, 7.0]).as_slice()
        );
        assert_eq!(st.tensor("steps").unwrap().shape(), &[] as &[usize]);
        assert_eq!(st.tensor("mask").unwrap().data(), &[1, 2, 3, 4, 5]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        // Header length is a multiple of 8, as the reference writer pads it.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0);
    }

    #[test]
    fn reference_crate_output_is_read_by_us() {
        use safetensors::tensor::TensorView;
        let a = encode_f32(&[1.0, 2.0, 3.0, 4.0]);
        let b: Vec<u8> = [half::bf16::from_f32(0.5), half::bf16::from_f32(-8.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let c = encode_i64(&[-3, 9]);
        let views = vec![
            (
                "a",
                TensorView::new(safetensors::Dtype::F32, vec![2, 2], &a).unwrap(),
            ),
            (
                "b",
                TensorView::new(safetensors::Dtype::BF16, vec![2], &b).unwrap(),
            ),
            (
                "c",
                TensorView::new(safetensors::Dtype::I64, vec![2], &c).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let dir = std::env::temp_dir().join(format!("whittle-tensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ref.safetensors");
        std::fs::write(&path, &bytes).unwrap();

        let header = read_header(&path).unwrap();
        assert_eq!(header, parse(&bytes).unwrap());
        let f = SafetensorsFile::open(&path).unwrap();
        let a_info = f.get("a").unwrap();
        assert_eq!(a_info.shape, vec![2, 2]);
        assert_eq!(f.to_f32(a_info).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(f.to_f32(f.get("b").unwrap()).unwrap(), vec![0.5, -8.0]);
        assert_eq!(f.to_i64(f.get("c").unwrap()).unwrap(), vec![-3, 9]);
        assert!(matches!(
            f.to_f32(f.get("c").unwrap()),
            Err(Error::UnsupportedDtype { .. })
        ));
        assert!(matches!(
            f.to_i64(a_info),
            Err(Error::UnsupportedDtype { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn our_round_trip_preserves_everything() {
        let bytes = sample_bytes();
        let h = parse(&bytes).unwrap();
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["fc1.weight", "fc1.bias", "half", "steps", "mask"]);
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(h.data_start % 8, 0);
        let half_info = h.get("half").unwrap();
        let data = &bytes[h.data_start + half_info.data_offsets.0..][..half_info.nbytes()];
        assert_eq!(
            decode_f32("half", Dtype::F16, data).unwrap(),
            vec![1.5, -2.0]
        );
        assert_eq!(h.get("steps").unwrap().numel(), 1);
        assert_eq!(h.data_len(), 24 + 12 + 4 + 8 + 5);
    }

    #[test]
    fn empty_metadata_is_omitted_and_empty_file_is_valid() {
        let bytes = serialize(&BTreeMap::new(), &[]).unwrap();
        assert_eq!(&bytes[8..], b"{}      ");
        let h = parse(&bytes).unwrap();
        assert!(h.tensors.is_empty() && h.metadata.is_empty());
        let spec = TensorSpec::new("x", Dtype::U8, vec![1]);
        let bytes = serialize(&BTreeMap::new(), &[(spec, &[7u8][..])]).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("__metadata__"));
    }

    #[test]
    fn unaligned_data_decodes() {
        // A U8 tensor of 1 byte puts the following F32 tensor at an odd offset.
        let x = encode_f32(&[1.25, -3.5]);
        let bytes = serialize(
            &BTreeMap::new(),
            &[
                (TensorSpec::new("a", Dtype::U8, vec![1]), &[9u8][..]),
                (TensorSpec::new("b", Dtype::F32, vec![2]), &x[..]),
            ],
        )
        .unwrap();
        let h = parse(&bytes).unwrap();
        let b = h.get("b").unwrap();
        assert_eq!(b.data_offsets, (1, 9));
        let data = &bytes[h.data_start + 1..h.data_start + 9];
        assert_eq!(decode_f32("b", Dtype::F32, data).unwrap(), vec![1.25, -3.5]);
    }

    #[test]
    fn f8_and_integer_decoding() {
        // E4M3: 0x38 = 1.0, 0xC0 = -2.0, 0x7F = NaN, 0x01 = smallest subnormal 2^-9.
        let v = decode_f32("f8", Dtype::F8E4M3, &[0x38, 0xC0, 0x01, 0x7E]).unwrap();
        assert_eq!(&v[..3], &[1.0, -2.0, 2f32.powi(-9)]);
        assert_eq!(v[3], 448.0);
        assert!(decode_f32("f8", Dtype::F8E4M3, &[0x7F]).unwrap()[0].is_nan());
        // E5M2: 0x3C = 1.0, 0xC0 = -2.0.
        assert_eq!(
            decode_f32("f8", Dtype::F8E5M2, &[0x3C, 0xC0]).unwrap(),
            vec![1.0, -2.0]
        );
        assert_eq!(
            decode_i64("i", Dtype::I8, &[0xFF, 0x05]).unwrap(),
            vec![-1, 5]
        );
        assert_eq!(
            decode_i64("i", Dtype::U16, &[0xFF, 0xFF]).unwrap(),
            vec![65535]
        );
        assert!(decode_i64("i", Dtype::U64, &u64::MAX.to_le_bytes()).is_err());
        assert!(decode_i64("i", Dtype::F32, &[0; 4]).is_err());
    }

    #[test]
    fn writer_checks_fill_byte_counts() {
        let specs = vec![TensorSpec::new("a", Dtype::F32, vec![2])];
        let mut out = Vec::new();
        let r = write_safetensors(&mut out, &BTreeMap::new(), &specs, |_, w| {
            w.write_all(&[0; 4])?;
            Ok(())
        });
        assert!(matches!(r, Err(Error::Internal(m)) if m.contains("wrote 4 bytes, expected 8")));
        let mut out = Vec::new();
        let n = write_safetensors(&mut out, &BTreeMap::new(), &specs, |_, w| {
            w.write_all(&encode_f32(&[1.0, 2.0]))?;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, out.len() as u64);
    }

    #[test]
    fn writer_refuses_duplicate_and_reserved_names() {
        let dup = vec![
            TensorSpec::new("a", Dtype::U8, vec![1]),
            TensorSpec::new("a", Dtype::U8, vec![1]),
        ];
        let r = write_safetensors(Vec::new(), &BTreeMap::new(), &dup, |_, w| {
            w.write_all(&[0])?;
            Ok(())
        });
        assert!(matches!(r, Err(Error::InvalidSafetensors(_))));
        let reserved = vec![TensorSpec::new("__metadata__", Dtype::U8, vec![1])];
        assert!(write_safetensors(Vec::new(), &BTreeMap::new(), &reserved, |_, _| Ok(())).is_err());
        let huge = vec![TensorSpec::new("a", Dtype::F64, vec![usize::MAX, 2])];
        assert!(write_safetensors(Vec::new(), &BTreeMap::new(), &huge, |_, _| Ok(())).is_err());
    }

    #[test]
    fn rejects_short_files_and_bad_lengths() {
        assert!(err(&[1, 2, 3]).contains("3 bytes long"));
        assert!(err(&[]).contains("0 bytes long"));
        let mut absurd = (200_000_000u64).to_le_bytes().to_vec();
        absurd.extend_from_slice(b"{}");
        assert!(err(&absurd).contains("limit"));
        let mut past = (100u64).to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(err(&past).contains("only 2 bytes follow"));
        // A prefix shorter than the declared header.
        let full = file("{}", &[]);
        assert!(matches!(
            parse_header(&full[..9], full.len() as u64),
            Err(Error::InvalidSafetensors(m)) if m.contains("truncated")
        ));
    }

    #[test]
    fn rejects_bad_json() {
        assert!(err(&file("{\"a\":", &[])).contains("not valid JSON"));
        let mut bad_utf8 = (4u64).to_le_bytes().to_vec();
        bad_utf8.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
        assert!(err(&bad_utf8).contains("UTF-8"));
        assert!(err(&file("[1,2]", &[])).contains("must be a JSON object, found an array"));
        assert!(err(&file("{} x", &[])).contains("not valid JSON"));
        assert!(err(&file("", &[])).contains("not valid JSON"));
    }

    #[test]
    fn rejects_duplicate_names() {
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let m = err(&file(h, &[0, 0]));
        assert!(m.contains("duplicate tensor name \"a\""), "{m}");
        let h = r#"{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(err(&file(h, &[0])).contains("duplicate key \"dtype\""));
        let h = r#"{"__metadata__":{"k":"1","k":"2"}}"#;
        assert!(err(&file(h, &[])).contains("duplicate key \"k\""));
    }

    #[test]
    fn rejects_bad_entries() {
        let cases = [
            (
                r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,1]}}"#,
                "unknown dtype \"F128\"",
            ),
            (
                r#"{"a":{"dtype":"U8","data_offsets":[0,1]}}"#,
                "missing field \"shape\"",
            ),
            (
                r#"{"a":{"shape":[1],"data_offsets":[0,1]}}"#,
                "missing field \"dtype\"",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1]}}"#,
                "missing field \"data_offsets\"",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}"#,
                "unknown field \"x\"",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                "non-negative integers",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#,
                "two non-negative",
            ),
            (
                r#"{"a":{"dtype":7,"shape":[1],"data_offsets":[0,1]}}"#,
                "dtype must be a string",
            ),
            (r#"{"a":[1]}"#, "expected an object"),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#,
                "end before they begin",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,1]}}"#,
                "needs 4 bytes",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
                "past the end",
            ),
            (
                r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
                "more elements than can be addressed",
            ),
            (r#"{"__metadata__":{"k":1}}"#, "must be a string"),
            (r#"{"__metadata__":["k"]}"#, "must be an object of strings"),
        ];
        for (header, want) in cases {
            // Metadata-only headers describe no data, so give them none.
            let data: &[u8] = if header.starts_with(r#"{"__metadata__""#) {
                &[]
            } else {
                &[0]
            };
            let m = err(&file(header, data));
            assert!(m.contains(want), "{header}: got {m:?}, wanted {want:?}");
        }
    }

    #[test]
    fn rejects_overlaps_holes_and_trailing_bytes() {
        let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        assert!(err(&file(overlap, &[0; 3])).contains("overlap"));
        let hole = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
        assert!(err(&file(hole, &[0; 3])).contains("belong to no tensor"));
        let trailing = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(err(&file(trailing, &[0; 3])).contains("2 trailing bytes"));
        // Same-offset aliasing of a real tensor is an overlap too.
        let alias = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(err(&file(alias, &[0])).contains("overlap"));
        // Zero-sized tensors take no room and may sit anywhere on the tiling.
        let empty = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"z":{"dtype":"F32","shape":[0,3],"data_offsets":[1,1]}}"#;
        assert_eq!(parse(&file(empty, &[0])).unwrap().tensors.len(), 2);
    }

    #[test]
    fn sorts_tensors_by_offset() {
        let h = r#"{"z":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let names: Vec<String> = parse(&file(h, &[0, 0]))
            .unwrap()
            .tensors
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["z", "a"]);
    }

    #[test]
    fn open_rejects_tiny_files() {
        let dir = std::env::temp_dir().join(format!("whittle-tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.safetensors");
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            SafetensorsFile::open(&path),
            Err(Error::InvalidSafetensors(_))
        ));
        assert!(matches!(
            read_header(&path),
            Err(Error::InvalidSafetensors(_))
        ));
        assert!(matches!(
            read_header(dir.join("missing")),
            Err(Error::Io(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
