//! Datasets (API.md, "Datasets"): parsing uploads into one in-memory form.
//!
//! This module owns the three upload formats (a safetensors file with `x` and optional
//! `y`, numeric CSV, the MNIST IDX pair, gzip accepted) and the canonical storage form
//! they are all converted to ([`Dataset::to_safetensors_bytes`]: `x` as U8 or F32, `y` as
//! I64). Every malformed input is an [`Error::InvalidDataset`] (or
//! [`Error::InvalidSafetensors`] for a broken safetensors file) that says where the problem
//! is; nothing here panics on user bytes. Splits, batching and shuffles build on [`Dataset`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use crate::compress::formats::safetensors::{
    self, Dtype, Header, SafetensorsFile, TensorInfo, TensorSpec,
};
use crate::compress::{Error, Result};

mod text;
pub use text::*;

/// Largest accepted number of classes (labels must be below this).
pub const MAX_CLASSES: usize = 1_000_000;

/// Largest accepted decompressed size of one gzip-compressed IDX file.
pub const MAX_IDX_BYTES: u64 = 1 << 30;

/// The upload format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// A safetensors file with `x` and optional `y`.
    Safetensors,
    /// Numeric CSV with a label column.
    Csv,
    /// The MNIST IDX pair (images + labels).
    Idx,
    /// UTF-8 text, documents separated by a blank line.
    Text,
    /// One JSON object a line: `text`, optional `text_pair` and `label`.
    Jsonl,
}

impl DatasetFormat {
    /// The format's name in the API (`safetensors`, `csv`, `idx`).
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Safetensors => "safetensors",
            DatasetFormat::Csv => "csv",
            DatasetFormat::Idx => "idx",
            DatasetFormat::Text => "text",
            DatasetFormat::Jsonl => "jsonl",
        }
    }

    /// Whether the format holds text (stored as canonical JSONL).
    pub fn is_text(self) -> bool {
        matches!(self, DatasetFormat::Text | DatasetFormat::Jsonl)
    }
}

impl FromStr for DatasetFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "safetensors" => Ok(DatasetFormat::Safetensors),
            "csv" => Ok(DatasetFormat::Csv),
            "idx" => Ok(DatasetFormat::Idx),
            "text" => Ok(DatasetFormat::Text),
            "jsonl" => Ok(DatasetFormat::Jsonl),
            other => Err(invalid(format!(
                "unknown dataset format {other:?} (expected safetensors, csv, idx, text or jsonl)"
            ))),
        }
    }
}

/// Feature values of every sample, flattened sample-major.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetX {
    /// Bytes (images), kept as they are to save memory; models see them as 0..=255 floats
    /// unless the compute engine scales them.
    U8(Vec<u8>),
    /// Floats.
    F32(Vec<f32>),
    /// Documents (text and jsonl datasets), tokenized by the network that reads them.
    Text(Vec<Document>),
}

impl DatasetX {
    /// Number of values (documents, for text).
    pub fn len(&self) -> usize {
        match self {
            DatasetX::U8(v) => v.len(),
            DatasetX::F32(v) => v.len(),
            DatasetX::Text(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype of the canonical safetensors form (`None` for text, stored as JSONL).
    pub fn dtype(&self) -> Option<Dtype> {
        match self {
            DatasetX::U8(_) => Some(Dtype::U8),
            DatasetX::F32(_) => Some(Dtype::F32),
            DatasetX::Text(_) => None,
        }
    }

    /// Little-endian bytes of the values (`None` for text).
    fn to_le_bytes(&self) -> Option<Cow<'_, [u8]>> {
        match self {
            DatasetX::U8(v) => Some(Cow::Borrowed(v.as_slice())),
            DatasetX::F32(v) => Some(Cow::Owned(safetensors::encode_f32(v))),
            DatasetX::Text(_) => None,
        }
    }
}

/// A parsed dataset: `samples` feature arrays of `feature_shape`, with optional labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Features, `samples × product(feature_shape)` values.
    pub x: DatasetX,
    /// The shape of one sample's features (no batch dimension).
    pub feature_shape: Vec<usize>,
    /// Number of samples.
    pub samples: usize,
    /// Class labels, one per sample, non-negative.
    pub y: Option<Vec<i64>>,
    /// `max(y) + 1` when there are labels.
    pub num_classes: Option<usize>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidDataset(msg.into())
}

impl Dataset {
    /// Checks the pieces agree and computes `num_classes`. `shape` is x's full shape,
    /// samples first.
    fn assemble(x: DatasetX, shape: &[usize], y: Option<Vec<i64>>) -> Result<Dataset> {
        let Some((&samples, feature_shape)) = shape.split_first() else {
            return Err(invalid("x must have a sample dimension"));
        };
        if samples == 0 {
            return Err(invalid("the dataset has no samples"));
        }
        if feature_shape.is_empty() {
            return Err(invalid(format!(
                "x has shape {shape:?}; it needs at least two dimensions [samples, features...]"
            )));
        }
        if feature_shape.contains(&0) {
            return Err(invalid(format!(
                "x has shape {shape:?}: every sample would have no features"
            )));
        }
        let expected = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if expected != Some(x.len()) {
            return Err(Error::Internal(format!(
                "x holds {} values but its shape is {shape:?}",
                x.len()
            )));
        }
        if let DatasetX::F32(v) = &x {
            if let Some(i) = v.iter().position(|f| !f.is_finite()) {
                return Err(invalid(format!(
                    "x holds a non-finite value ({}) in sample {}",
                    v[i],
                    i / (x.len() / samples)
                )));
            }
        }
        let num_classes = match &y {
            None => None,
            Some(labels) => {
                if labels.len() != samples {
                    return Err(invalid(format!(
                        "y has {} labels but x has {samples} samples",
                        labels.len()
                    )));
                }
                let mut max = 0i64;
                for (i, &l) in labels.iter().enumerate() {
                    if l < 0 {
                        return Err(invalid(format!(
                            "label of sample {i} is {l}; labels must be non-negative class indices"
                        )));
                    }
                    if l >= MAX_CLASSES as i64 {
                        return Err(invalid(format!(
                            "label of sample {i} is {l}, beyond the limit of {MAX_CLASSES} classes"
                        )));
                    }
                    max = max.max(l);
                }
                // max < MAX_CLASSES, so it fits usize.
                Some(max as usize + 1)
            }
        };
        Ok(Dataset {
            x,
            feature_shape: feature_shape.to_vec(),
            samples,
            y,
            num_classes,
        })
    }

    /// Number of feature values per sample.
    pub fn features_per_sample(&self) -> usize {
        self.feature_shape.iter().product()
    }

    /// Reads a safetensors dataset file: tensor `x` (U8 or any float dtype, samples
    /// first) and optional `y` (integer class labels, one per sample).
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Dataset> {
        let file = SafetensorsFile::open(path)?;
        Dataset::from_header(file.header(), |t| file.bytes(t))
    }

    /// Like [`Dataset::from_safetensors`], from the file's bytes in memory.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Dataset> {
        let header = safetensors::parse_header(bytes, bytes.len() as u64)?;
        Dataset::from_header(&header, |t| {
            let begin = header.data_start + t.data_offsets.0;
            let end = header.data_start + t.data_offsets.1;
            // parse_header checked every tensor lies within the file.
            bytes.get(begin..end).unwrap_or(&[])
        })
    }

    fn from_header<'a>(
        header: &Header,
        bytes: impl Fn(&TensorInfo) -> &'a [u8],
    ) -> Result<Dataset> {
        if let Some(t) = header
            .tensors
            .iter()
            .find(|t| t.name != "x" && t.name != "y")
        {
            return Err(invalid(format!(
                "unexpected tensor {:?}: a dataset file holds `x` (features) and optionally `y` (labels)",
                t.name
            )));
        }
        let x_info = header
            .get("x")
            .ok_or_else(|| invalid("missing tensor `x` (features, samples first)"))?;
        let x = match x_info.dtype {
            Dtype::U8 => DatasetX::U8(bytes(x_info).to_vec()),
            d if d.is_float() => DatasetX::F32(safetensors::decode_f32("x", d, bytes(x_info))?),
            d => {
                return Err(invalid(format!(
                    "x has dtype {d}; expected U8 or a floating-point dtype"
                )))
            }
        };
        let y = match header.get("y") {
            None => None,
            Some(t) => {
                if !t.dtype.is_integer() {
                    return Err(invalid(format!(
                        "y has dtype {}; class labels must be an integer dtype (I64 as PyTorch writes them)",
                        t.dtype
                    )));
                }
                if t.shape.len() != 1 {
                    return Err(invalid(format!(
                        "y has shape {:?}; it must be one-dimensional, one label per sample",
                        t.shape
                    )));
                }
                Some(
                    safetensors::decode_i64("y", t.dtype, bytes(t))
                        .map_err(|e| invalid(e.to_string()))?,
                )
            }
        };
        Dataset::assemble(x, &x_info.shape, y)
    }

    /// Parses numeric CSV. The header row is optional (a first row with any non-numeric
    /// cell is a header); `label_column` names the label column by header name or by
    /// 0-based index, a header name winning over an index (default: the last column). Labels must be non-negative integers;
    /// every other column is a float feature. Blank lines are skipped; quoted cells are
    /// understood (but not line breaks inside quotes).
    pub fn from_csv(bytes: &[u8], label_column: Option<&str>) -> Result<Dataset> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            invalid(format!(
                "the CSV is not valid UTF-8 (byte {})",
                e.valid_up_to()
            ))
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut rows = Vec::new();
        for (i, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let cells =
                split_csv_line(line).map_err(|m| invalid(format!("line {}: {m}", i + 1)))?;
            rows.push((i + 1, cells));
        }
        let Some((_, first)) = rows.first() else {
            return Err(invalid("the CSV has no rows"));
        };
        let columns = first.len();
        let has_header = first.iter().any(|c| c.parse::<f64>().is_err());
        let header: Option<Vec<String>> = has_header.then(|| first.clone());
        if columns < 2 {
            return Err(invalid(format!(
                "the CSV has {columns} column; it needs at least one feature column and a label column"
            )));
        }
        let label = match label_column {
            None => columns - 1,
            Some(wanted) => {
                let by_name = header.as_ref().and_then(|h| {
                    let mut hits = h.iter().enumerate().filter(|(_, n)| n.as_str() == wanted);
                    hits.next().map(|(i, _)| (i, hits.next().is_some()))
                });
                match (by_name, wanted.parse::<usize>()) {
                    (Some((_, true)), _) => {
                        return Err(invalid(format!(
                            "label column {wanted:?} appears more than once in the header"
                        )))
                    }
                    (Some((i, false)), _) => i,
                    (None, Ok(i)) if i < columns => i,
                    (None, Ok(i)) => {
                        return Err(invalid(format!(
                            "label column index {i} is out of range: the CSV has {columns} columns (indexes 0 to {})",
                            columns - 1
                        )))
                    }
                    (None, Err(_)) => {
                        return Err(invalid(match &header {
                            Some(h) => format!(
                                "no column named {wanted:?} (the header has: {})",
                                h.join(", ")
                            ),
                            None => format!(
                                "no column named {wanted:?}: the CSV has no header row (give a 0-based column index instead)"
                            ),
                        }))
                    }
                }
            }
        };
        let column_name = |c: usize| match &header {
            Some(h) => format!("column {} ({:?})", c + 1, h[c]),
            None => format!("column {}", c + 1),
        };

        let data_rows = &rows[usize::from(has_header)..];
        if data_rows.is_empty() {
            return Err(invalid("the CSV has a header row but no data rows"));
        }
        let features = columns - 1;
        let mut x = Vec::with_capacity(data_rows.len().saturating_mul(features));
        let mut y = Vec::with_capacity(data_rows.len());
        for (line, cells) in data_rows {
            if cells.len() != columns {
                return Err(invalid(format!(
                    "line {line}: expected {columns} columns like the first row, found {}",
                    cells.len()
                )));
            }
            for (c, cell) in cells.iter().enumerate() {
                let value: f64 = cell.parse().map_err(|_| {
                    invalid(format!(
                        "line {line}, {}: {cell:?} is not a number",
                        column_name(c)
                    ))
                })?;
                if c == label {
                    if value.fract() != 0.0 || value < 0.0 || value >= MAX_CLASSES as f64 {
                        return Err(invalid(format!(
                            "line {line}, {}: label {cell:?} is not a class index (a non-negative integer below {MAX_CLASSES})",
                            column_name(c)
                        )));
                    }
                    y.push(value as i64);
                } else {
                    let f = value as f32;
                    if !f.is_finite() {
                        return Err(invalid(format!(
                            "line {line}, {}: {cell:?} is not a finite 32-bit float",
                            column_name(c)
                        )));
                    }
                    x.push(f);
                }
            }
        }
        let samples = y.len();
        Dataset::assemble(DatasetX::F32(x), &[samples, features], Some(y))
    }

    /// Parses the MNIST IDX pair: `images` (magic 0x00000803, unsigned bytes
    /// `[n, rows, cols]`) and `labels` (magic 0x00000801, `[n]`), each optionally
    /// gzip-compressed. Features get shape `[1, rows, cols]` (one channel, as torchvision's
    /// MNIST tensors), so they feed a conv net or, through `flatten`, an MLP.
    pub fn from_idx(images: &[u8], labels: &[u8]) -> Result<Dataset> {
        let images = gunzip_if_needed(images, "images")?;
        let labels = gunzip_if_needed(labels, "labels")?;
        let (image_dims, pixels) = parse_idx(&images, "images", 3)?;
        let (label_dims, label_bytes) = parse_idx(&labels, "labels", 1)?;
        let (n, rows, cols) = (image_dims[0], image_dims[1], image_dims[2]);
        if label_dims[0] != n {
            return Err(invalid(format!(
                "the images file holds {n} images but the labels file holds {} labels",
                label_dims[0]
            )));
        }
        let y = label_bytes.iter().map(|&b| i64::from(b)).collect();
        Dataset::assemble(DatasetX::U8(pixels.to_vec()), &[n, 1, rows, cols], Some(y))
    }

    /// The canonical storage form: a safetensors file with `x` (U8 or F32,
    /// `[samples, feature_shape...]`) and, when labelled, `y` (I64, `[samples]`).
    /// Fails only if the public fields were edited into disagreement.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let mut shape = vec![self.samples];
        shape.extend_from_slice(&self.feature_shape);
        let (Some(x_bytes), Some(dtype)) = (self.x.to_le_bytes(), self.x.dtype()) else {
            return Err(Error::Internal(
                "a text dataset is stored as JSONL, not safetensors".into(),
            ));
        };
        let y_bytes = self.y.as_deref().map(safetensors::encode_i64);
        let mut parts: Vec<(TensorSpec, &[u8])> =
            vec![(TensorSpec::new("x", dtype, shape), &x_bytes)];
        if let Some(y) = &y_bytes {
            parts.push((TensorSpec::new("y", Dtype::I64, vec![self.samples]), y));
        }
        safetensors::serialize(&BTreeMap::new(), &parts)
    }
}

/// Splits one CSV line into trimmed cells, honouring double quotes (`""` inside quotes
/// is a literal quote).
fn split_csv_line(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut chars = line.chars().peekable();
    let mut in_quotes = false;
    while let Some(c) = chars.next() {
        match (c, in_quotes) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            ('"', true) => in_quotes = false,
            ('"', false) if cell.trim().is_empty() => {
                cell.clear();
                in_quotes = true;
            }
            (',', false) => cells.push(std::mem::take(&mut cell).trim().to_owned()),
            (c, _) => cell.push(c),
        }
    }
    if in_quotes {
        return Err("unterminated quoted cell".to_owned());
    }
    cells.push(cell.trim().to_owned());
    Ok(cells)
}

/// Decompresses gzip input (magic `1f 8b`), refusing output over [`MAX_IDX_BYTES`].
fn gunzip_if_needed<'a>(bytes: &'a [u8], what: &str) -> Result<Cow<'a, [u8]>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| invalid(format!("{what}: the gzip data is corrupt ({e})")))?;
    if out.len() as u64 > MAX_IDX_BYTES {
        return Err(invalid(format!(
            "{what}: decompresses to more than {MAX_IDX_BYTES} bytes"
        )));
    }
    Ok(Cow::Owned(out))
}

/// Parses an unsigned-byte IDX file with `ndims` dimensions: returns the dimensions and
/// the data, which must be exactly their product long.
fn parse_idx<'a>(bytes: &'a [u8], what: &str, ndims: u8) -> Result<(Vec<usize>, &'a [u8])> {
    let magic = 0x0800 | u32::from(ndims);
    let header_len = 4 + 4 * usize::from(ndims);
    let found = bytes
        .get(..4)
        .map(|m| u32::from_be_bytes([m[0], m[1], m[2], m[3]]));
    if found != Some(magic) {
        let found = found.map_or_else(
            || format!("only {} bytes", bytes.len()),
            |m| format!("magic number 0x{m:08x}"),
        );
        return Err(invalid(format!(
            "{what}: not an IDX {} file: expected magic number 0x{magic:08x} (unsigned bytes, {ndims} dimension{}), found {found}",
            if ndims == 3 { "images" } else { "labels" },
            if ndims == 1 { "" } else { "s" }
        )));
    }
    let Some(dim_bytes) = bytes.get(4..header_len) else {
        return Err(invalid(format!(
            "{what}: the IDX header is truncated ({} bytes, expected {header_len})",
            bytes.len()
        )));
    };
    let dims: Vec<usize> = dim_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let data = &bytes[header_len..];
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if expected != Some(data.len()) {
        let dims_text = dims
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("x");
        return Err(invalid(format!(
            "{what}: the IDX header declares {dims_text} bytes of data, but the file holds {}",
            data.len()
        )));
    }
    Ok((dims, data))
}

/// A view of some samples of a [`Dataset`] by index: a split, a shuffled epoch order, or
/// the whole set. Batching reads through the indices, so nothing is copied per epoch.
#[derive(Debug, Clone)]
pub struct Subset<'a> {
    /// The dataset the indices point into.
    pub dataset: &'a Dataset,
    /// Sample indices, each below `dataset.samples`.
    pub indices: Vec<usize>,
}

impl<'a> Subset<'a> {
    /// Every sample, in order.
    pub fn all(dataset: &'a Dataset) -> Subset<'a> {
        Subset {
            dataset,
            indices: (0..dataset.samples).collect(),
        }
    }

    /// Number of samples in the view.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Batches in index order (the caller shuffles `indices` for a training epoch).
    /// The last batch holds the remainder.
    pub fn batches(&self, batch_size: usize) -> Batches<'_> {
        Batches {
            dataset: self.dataset,
            indices: &self.indices,
            batch_size: batch_size.max(1),
            next: 0,
            scratch: Vec::new(),
            text: None,
        }
    }
}

/// Fisher–Yates shuffle of `indices` driven by `rng` (deterministic for a seeded rng).
pub fn shuffle_indices(indices: &mut [usize], rng: &mut impl rand::Rng) {
    for i in (1..indices.len()).rev() {
        let j = rng.gen_range(0..=i);
        indices.swap(i, j);
    }
}

impl Dataset {
    /// Whether the samples are texts (tokenized by the model that reads them).
    pub fn is_text(&self) -> bool {
        matches!(self.x, DatasetX::Text(_))
    }

    /// A seeded random split into (train, validation) views, the validation view holding
    /// `round(fraction × samples)` samples. Both views must end up non-empty.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Subset<'_>, Subset<'_>)> {
        use rand::SeedableRng;
        if !(fraction.is_finite() && fraction > 0.0 && fraction < 1.0) {
            return Err(invalid(format!(
                "the validation fraction must lie strictly between 0 and 1, got {fraction}"
            )));
        }
        let val = ((self.samples as f64) * fraction).round() as usize;
        if val == 0 || val >= self.samples {
            return Err(invalid(format!(
                "a validation fraction of {fraction} of {} samples leaves {} for validation and {} for training; both need at least one",
                self.samples,
                val,
                self.samples.saturating_sub(val)
            )));
        }
        let mut order: Vec<usize> = (0..self.samples).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        shuffle_indices(&mut order, &mut rng);
        let train = order.split_off(val);
        Ok((
            Subset {
                dataset: self,
                indices: train,
            },
            Subset {
                dataset: self,
                indices: order,
            },
        ))
    }

    /// The features of sample `i` as f32, appended to `out`: U8 features are scaled to
    /// [0, 1] (divided by 255), F32 features are used as they are.
    fn push_features(&self, i: usize, out: &mut Vec<f32>) {
        let n = self.features_per_sample();
        let range = i * n..(i + 1) * n;
        match &self.x {
            DatasetX::U8(v) => {
                if let Some(s) = v.get(range) {
                    out.extend(s.iter().map(|&b| f32::from(b) / 255.0));
                }
            }
            DatasetX::F32(v) => {
                if let Some(s) = v.get(range) {
                    out.extend_from_slice(s);
                }
            }
            DatasetX::Text(_) => {}
        }
    }
}

/// One batch: features `[n, feature_shape...]` (f32) — or, for text, token ids `[n, seq]`
/// (u32) with their attention mask — and, for labelled data, labels `[n]` (u32).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Features (f32), or token ids (u32), samples first.
    pub x: candle_core::Tensor,
    /// Text: 1 for a real token, 0 for padding, `[n, seq]` (f32); `None`: every position counts.
    pub mask: Option<candle_core::Tensor>,
    /// Text pairs: the segment (token type) of each token, `[n, seq]` (u32); `None`: all 0.
    pub segments: Option<candle_core::Tensor>,
    /// Class labels as a u32 tensor, when the dataset is labelled.
    pub y: Option<candle_core::Tensor>,
    /// The same labels on the host (for accuracy counting without a device round trip).
    pub labels: Option<Vec<u32>>,
    /// Number of samples in the batch.
    pub len: usize,
    /// The dataset row of each sample, in batch order (for per-sample caches such as a
    /// distillation teacher's logits).
    pub indices: Vec<usize>,
}

/// Iterator over the batches of a [`Subset`], producing CPU tensors. Only one batch's
/// features are materialised at a time.
pub struct Batches<'a> {
    dataset: &'a Dataset,
    indices: &'a [usize],
    batch_size: usize,
    next: usize,
    scratch: Vec<f32>,
    text: Option<TextInput<'a>>,
}

impl<'a> Batches<'a> {
    /// Batches that tokenize a text dataset with `text` (the reading network's tokenizer).
    pub fn reading(mut self, text: Option<TextInput<'a>>) -> Batches<'a> {
        self.text = text;
        self
    }

    /// Number of batches in total.
    pub fn batch_count(&self) -> usize {
        self.indices.len().div_ceil(self.batch_size)
    }

    fn make(&mut self, idx: &[usize]) -> Result<Batch> {
        if let Some(docs) = self.dataset.documents() {
            let Some(text) = self.text else {
                return Err(Error::DatasetMismatch(
                    "a text dataset is read by a transformer (bert or llama) with a tokenizer.json"
                        .into(),
                ));
            };
            let mut encoded = Vec::with_capacity(idx.len());
            for &i in idx {
                let doc = docs.get(i).ok_or_else(|| {
                    Error::Internal(format!("document {i} out of range for {}", docs.len()))
                })?;
                encoded.push(text.encoder.encode(doc, text.max_len)?);
            }
            let labels: Option<Vec<u32>> = self.dataset.y.as_ref().map(|y| {
                idx.iter()
                    .map(|&i| y.get(i).copied().unwrap_or(0) as u32)
                    .collect()
            });
            return text_batch(&encoded, text.pad_id, labels.as_deref(), idx.to_vec());
        }
        let device = candle_core::Device::Cpu;
        self.scratch.clear();
        for &i in idx {
            if i >= self.dataset.samples {
                return Err(Error::Internal(format!(
                    "sample index {i} out of range for {} samples",
                    self.dataset.samples
                )));
            }
            self.dataset.push_features(i, &mut self.scratch);
        }
        let mut shape = vec![idx.len()];
        shape.extend_from_slice(&self.dataset.feature_shape);
        let x = candle_core::Tensor::from_slice(&self.scratch, shape, &device)
            .map_err(|e| Error::Internal(format!("batch features: {e}")))?;
        let labels: Option<Vec<u32>> = self.dataset.y.as_ref().map(|y| {
            idx.iter()
                // Labels are below MAX_CLASSES (checked on parse), so they fit u32.
                .map(|&i| y.get(i).copied().unwrap_or(0) as u32)
                .collect()
        });
        let y = match &labels {
            Some(l) => Some(
                candle_core::Tensor::from_slice(l, idx.len(), &device)
                    .map_err(|e| Error::Internal(format!("batch labels: {e}")))?,
            ),
            None => None,
        };
        Ok(Batch {
            x,
            mask: None,
            segments: None,
            y,
            labels,
            len: idx.len(),
            indices: idx.to_vec(),
        })
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.indices.len() {
            return None;
        }
        let end = (self.next + self.batch_size).min(self.indices.len());
        let indices = self.indices;
        let idx = &indices[self.next..end];
        self.next = end;
        Some(self.make(idx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn message(r: Result<Dataset>) -> String {
        match r {
            Err(Error::InvalidDataset(m)) => m,
            other => panic!("expected InvalidDataset, got {other:?}"),
        }
    }

    fn st(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let parts: Vec<(TensorSpec, &[u8])> = tensors
            .iter()
            .map(|(n, d, s, b)| (TensorSpec::new(*n, *d, s.clone()), b.as_slice()))
            .collect();
        safetensors::serialize(&BTreeMap::new(), &parts).unwrap()
    }

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn safetensors_round_trip_and_dtypes() {
        let x: Vec<f32> = (0..12).map(|i| i as f32 / 2.0).collect();
        let bytes = st(&[
            ("x", Dtype::F32, vec![3, 2, 2], safetensors::encode_f32(&x)),
            (
                "y",
                Dtype::I64,
                vec![3],
                safetensors::encode_i64(&[0, 4, 2]),
            ),
        ]);
        let d = Dataset::from_safetensors_bytes(&bytes).unwrap();
        assert_eq!(d.samples, 3);
        assert_eq!(d.feature_shape, vec![2, 2]);
        assert_eq!(d.num_classes, Some(5));
        assert_eq!(d.x, DatasetX::F32(x));
        // Canonical form reads back identically, also from a file.
        let canon = d.to_safetensors_bytes().unwrap();
        assert_eq!(Dataset::from_safetensors_bytes(&canon).unwrap(), d);
        let dir = std::env::temp_dir().join(format!("whittle-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.safetensors");
        std::fs::write(&path, &canon).unwrap();
        assert_eq!(Dataset::from_safetensors(&path).unwrap(), d);
        std::fs::remove_dir_all(&dir).unwrap();

        // F16 features become F32; U8 stays U8; unlabelled is fine; I32 labels are fine.
        let h: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let d = Dataset::from_safetensors_bytes(&st(&[("x", Dtype::F16, vec![1, 2], h)])).unwrap();
        assert_eq!(d.x, DatasetX::F32(vec![1.5, -2.0]));
        assert_eq!((d.y, d.num_classes), (None, None));
        let d = Dataset::from_safetensors_bytes(&st(&[
            ("x", Dtype::U8, vec![2, 1], vec![7, 9]),
            (
                "y",
                Dtype::I32,
                vec![2],
                [1i32, 0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ]))
        .unwrap();
        assert_eq!(d.x, DatasetX::U8(vec![7, 9]));
        assert_eq!(d.y, Some(vec![1, 0]));
        let canon = d.to_safetensors_bytes().unwrap();
        let header = safetensors::parse_header(&canon, canon.len() as u64).unwrap();
        assert_eq!(header.get("x").unwrap().dtype, Dtype::U8);
        assert_eq!(header.get("y").unwrap().dtype, Dtype::I64);
    }

    #[test]
    fn safetensors_rejections() {
        let x = || {
            (
                "x",
                Dtype::F32,
                vec![2, 1],
                safetensors::encode_f32(&[1.0, 2.0]),
            )
        };
        let m = message(Dataset::from_safetensors_bytes(&st(&[
            x(),
            (
                "y",
                Dtype::I64,
                vec![3],
                safetensors::encode_i64(&[0, 1, 2]),
            ),
        ])));
        assert!(m.contains("y has 3 labels but x has 2 samples"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[
            x(),
            ("y", Dtype::I64, vec![2], safetensors::encode_i64(&[0, -1])),
        ])));
        assert!(m.contains("non-negative"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[
            x(),
            (
                "y",
                Dtype::I64,
                vec![2],
                safetensors::encode_i64(&[0, 1 << 40]),
            ),
        ])));
        assert!(m.contains("limit"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[
            x(),
            (
                "y",
                Dtype::F32,
                vec![2],
                safetensors::encode_f32(&[0.0, 1.0]),
            ),
        ])));
        assert!(m.contains("integer dtype"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[
            x(),
            (
                "y",
                Dtype::I64,
                vec![2, 1],
                safetensors::encode_i64(&[0, 1]),
            ),
        ])));
        assert!(m.contains("one-dimensional"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[(
            "y",
            Dtype::I64,
            vec![1],
            safetensors::encode_i64(&[0]),
        )])));
        assert!(m.contains("missing tensor `x`"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[
            x(),
            (
                "labels",
                Dtype::I64,
                vec![2],
                safetensors::encode_i64(&[0, 1]),
            ),
        ])));
        assert!(m.contains("unexpected tensor \"labels\""), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[(
            "x",
            Dtype::I64,
            vec![1, 1],
            safetensors::encode_i64(&[0]),
        )])));
        assert!(m.contains("U8 or a floating-point"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[(
            "x",
            Dtype::F32,
            vec![2],
            safetensors::encode_f32(&[0.0, 1.0]),
        )])));
        assert!(m.contains("at least two dimensions"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[(
            "x",
            Dtype::F32,
            vec![0, 3],
            vec![],
        )])));
        assert!(m.contains("no samples"), "{m}");
        let m = message(Dataset::from_safetensors_bytes(&st(&[(
            "x",
            Dtype::F32,
            vec![2, 1],
            safetensors::encode_f32(&[0.0, f32::NAN]),
        )])));
        assert!(m.contains("non-finite") && m.contains("sample 1"), "{m}");
        assert!(matches!(
            Dataset::from_safetensors_bytes(b"nonsense"),
            Err(Error::InvalidSafetensors(_))
        ));
    }

    #[test]
    fn csv_with_and_without_header() {
        let d = Dataset::from_csv(b"a,b,label\n1,2,0\n3.5,-4,2\r\n\n", None).unwrap();
        assert_eq!(d.samples, 2);
        assert_eq!(d.feature_shape, vec![2]);
        assert_eq!(d.x, DatasetX::F32(vec![1.0, 2.0, 3.5, -4.0]));
        assert_eq!(d.y, Some(vec![0, 2]));
        assert_eq!(d.num_classes, Some(3));

        let d = Dataset::from_csv(b"1,0.5,7\n0,1.5,8\n", Some("0")).unwrap();
        assert_eq!(d.x, DatasetX::F32(vec![0.5, 7.0, 1.5, 8.0]));
        assert_eq!(d.y, Some(vec![1, 0]));

        let d = Dataset::from_csv(
            "\u{feff}\"class\",\"x, y\"\n\"1\", 2.0\n0,3\n".as_bytes(),
            Some("class"),
        )
        .unwrap();
        assert_eq!(d.y, Some(vec![1, 0]));
        assert_eq!(d.x, DatasetX::F32(vec![2.0, 3.0]));
        // A label written as 2.0 is still class 2.
        assert_eq!(
            Dataset::from_csv(b"1,2.0\n", None).unwrap().y,
            Some(vec![2])
        );
    }

    #[test]
    fn csv_rejections() {
        let m = message(Dataset::from_csv(b"a,b,c\n1,2,0\n1,2\n", None));
        assert!(
            m.contains("line 3") && m.contains("expected 3 columns"),
            "{m}"
        );
        let m = message(Dataset::from_csv(b"a,b\n1,2\nx,1\n", None));
        assert!(
            m.contains("line 3, column 1 (\"a\"): \"x\" is not a number"),
            "{m}"
        );
        let m = message(Dataset::from_csv(b"1,2\n1,-1\n", None));
        assert!(m.contains("line 2") && m.contains("class index"), "{m}");
        let m = message(Dataset::from_csv(b"1,2\n1,0.5\n", None));
        assert!(m.contains("class index"), "{m}");
        let m = message(Dataset::from_csv(b"1,nan\n", Some("0")));
        assert!(m.contains("finite"), "{m}");
        let m = message(Dataset::from_csv(b"a,b\n1,2\n", Some("c")));
        assert!(
            m.contains("no column named \"c\"") && m.contains("a, b"),
            "{m}"
        );
        let m = message(Dataset::from_csv(b"1,2\n", Some("5")));
        assert!(m.contains("out of range"), "{m}");
        let m = message(Dataset::from_csv(b"1,2\n", Some("label")));
        assert!(m.contains("no header row"), "{m}");
        let m = message(Dataset::from_csv(b"a,b\n", None));
        assert!(m.contains("no data rows"), "{m}");
        let m = message(Dataset::from_csv(b"\n\n", None));
        assert!(m.contains("no rows"), "{m}");
        let m = message(Dataset::from_csv(b"1\n2\n", None));
        assert!(m.contains("at least one feature column"), "{m}");
        let m = message(Dataset::from_csv(b"\"a,b\n", None));
        assert!(m.contains("line 1: unterminated"), "{m}");
        let m = message(Dataset::from_csv(&[0xff, b'\n'], None));
        assert!(m.contains("UTF-8"), "{m}");
        let m = message(Dataset::from_csv(b"a,a,b\n1,2,3\n", Some("a")));
        assert!(m.contains("more than once"), "{m}");
    }

    #[test]
    fn idx_plain_and_gzip() {
        let pixels: Vec<u8> = (0..2 * 3 * 2).collect();
        let images = idx(0x0803, &[2, 3, 2], &pixels);
        let labels = idx(0x0801, &[2], &[7, 3]);
        let d = Dataset::from_idx(&images, &labels).unwrap();
        assert_eq!(d.samples, 2);
        assert_eq!(d.feature_shape, vec![1, 3, 2]);
        assert_eq!(d.x, DatasetX::U8(pixels));
        assert_eq!(d.y, Some(vec![7, 3]));
        assert_eq!(d.num_classes, Some(8));
        assert_eq!(
            Dataset::from_idx(&gzip(&images), &gzip(&labels)).unwrap(),
            d
        );
        assert_eq!(Dataset::from_idx(&gzip(&images), &labels).unwrap(), d);
        let canon = d.to_safetensors_bytes().unwrap();
        assert_eq!(Dataset::from_safetensors_bytes(&canon).unwrap(), d);
    }

    #[test]
    fn idx_rejections() {
        let images = idx(0x0803, &[2, 2, 2], &[0; 8]);
        let labels = idx(0x0801, &[2], &[1, 2]);
        // Swapped files: wrong magic.
        let m = message(Dataset::from_idx(&labels, &images));
        assert!(
            m.contains("images: not an IDX images file") && m.contains("0x00000801"),
            "{m}"
        );
        let m = message(Dataset::from_idx(
            &idx(0x0d03, &[2, 2, 2], &[0; 32]),
            &labels,
        ));
        assert!(m.contains("magic"), "{m}");
        // Count mismatch.
        let m = message(Dataset::from_idx(&images, &idx(0x0801, &[3], &[1, 2, 3])));
        assert!(
            m.contains("2 images but the labels file holds 3 labels"),
            "{m}"
        );
        // Data shorter or longer than the header says.
        let m = message(Dataset::from_idx(
            &idx(0x0803, &[2, 2, 2], &[0; 7]),
            &labels,
        ));
        assert!(
            m.contains("2x2x2 bytes of data, but the file holds 7"),
            "{m}"
        );
        let m = message(Dataset::from_idx(&images, &idx(0x0801, &[2], &[1, 2, 3])));
        assert!(m.contains("labels:"), "{m}");
        // Truncated headers and tiny files.
        let m = message(Dataset::from_idx(&images[..6], &labels));
        assert!(m.contains("truncated"), "{m}");
        let m = message(Dataset::from_idx(&[0, 0], &labels));
        assert!(m.contains("only 2 bytes"), "{m}");
        // Corrupt gzip.
        let mut bad = gzip(&images);
        bad.truncate(bad.len() / 2);
        let m = message(Dataset::from_idx(&bad, &labels));
        assert!(m.contains("gzip"), "{m}");
        // Zero images.
        let m = message(Dataset::from_idx(
            &idx(0x0803, &[0, 2, 2], &[]),
            &idx(0x0801, &[0], &[]),
        ));
        assert!(m.contains("no samples"), "{m}");
    }

    #[test]
    fn format_names() {
        for f in [
            DatasetFormat::Safetensors,
            DatasetFormat::Csv,
            DatasetFormat::Idx,
        ] {
            assert_eq!(f.as_str().parse::<DatasetFormat>().unwrap(), f);
            assert_eq!(serde_json::to_value(f).unwrap(), f.as_str());
        }
        assert!("parquet".parse::<DatasetFormat>().is_err());
    }

    #[test]
    fn split_and_batches_are_seeded_and_scaled() {
        let x: Vec<u8> = (0..10u8).flat_map(|i| [i, 255]).collect();
        let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
        let d = Dataset::assemble(DatasetX::U8(x), &[10, 2], Some(y)).unwrap();
        let (tr, va) = d.split(0.3, 1).unwrap();
        assert_eq!((tr.len(), va.len()), (7, 3));
        let (tr2, va2) = d.split(0.3, 1).unwrap();
        assert_eq!(
            (tr.indices.clone(), va.indices.clone()),
            (tr2.indices, va2.indices)
        );
        let mut all: Vec<usize> = tr.indices.iter().chain(&va.indices).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_ne!(d.split(0.3, 2).unwrap().1.indices, va.indices);
        assert!(message(d.split(0.01, 0).map(|_| d.clone())).contains("at least one"));
        assert!(message(d.split(1.0, 0).map(|_| d.clone())).contains("strictly between"));

        let view = Subset {
            dataset: &d,
            indices: vec![3, 0, 9],
        };
        let mut b = view.batches(2);
        assert_eq!(b.batch_count(), 2);
        let first = b.next().unwrap().unwrap();
        assert_eq!(first.len, 2);
        assert_eq!(
            first.x.to_vec2::<f32>().unwrap(),
            vec![vec![3.0 / 255.0, 1.0], vec![0.0, 1.0]]
        );
        assert_eq!(first.labels, Some(vec![0, 0]));
        assert_eq!(first.indices, vec![3, 0]);
        assert_eq!(first.y.unwrap().to_vec1::<u32>().unwrap(), vec![0, 0]);
        let last = b.next().unwrap().unwrap();
        assert_eq!((last.len, last.labels), (1, Some(vec![0])));
        assert_eq!(last.indices, vec![9]);
        assert!(b.next().is_none());

        let mut idx: Vec<usize> = (0..50).collect();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
        shuffle_indices(&mut idx, &mut rng);
        assert_ne!(idx, (0..50).collect::<Vec<_>>());
        idx.sort_unstable();
        assert_eq!(idx, (0..50).collect::<Vec<_>>());
    }
}
