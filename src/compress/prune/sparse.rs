//! Reading the sparse `bitmask-v1` format back into dense tensors.

#[allow(unused_imports)]
use super::*;

// Reading the sparse format.

/// Reads a file, restoring every `bitmask-v1` packed tensor to a dense f32 tensor (pruned
/// elements +0) at its mask's position; the other tensors are converted to f32 (integers
/// through i64). A file without `whittle.sparse` metadata is read as dense.
pub fn decode_sparse(file: &SafetensorsFile) -> Result<Vec<NamedTensor>> {
    let bad = |m: String| Error::InvalidSafetensors(m);
    let packed: BTreeMap<String, (Dtype, Vec<usize>)> =
        match file.header().metadata.get(SPARSE_METADATA_KEY) {
            None => BTreeMap::new(),
            Some(text) => parse_sparse_metadata(text).map_err(bad)?,
        };
    let mut out = Vec::new();
    for info in &file.header().tensors {
        if let Some(base) = info.name.strip_suffix(MASK_SUFFIX) {
            if let Some((dtype, shape)) = packed.get(base) {
                out.push(unpack(file, info, base, *dtype, shape)?);
                continue;
            }
        }
        if let Some(base) = info.name.strip_suffix(VALUES_SUFFIX) {
            if packed.contains_key(base) {
                continue;
            }
        }
        let values = if info.dtype.is_float() {
            file.to_f32(info)?
        } else {
            file.to_i64(info)?.into_iter().map(|v| v as f32).collect()
        };
        out.push(NamedTensor {
            name: info.name.clone(),
            shape: info.shape.clone(),
            values,
        });
    }
    for base in packed.keys() {
        if file.get(&format!("{base}{MASK_SUFFIX}")).is_none() {
            return Err(bad(format!(
                "{SPARSE_METADATA_KEY} lists {base} but the file has no {base}{MASK_SUFFIX}"
            )));
        }
    }
    Ok(out)
}

pub(super) fn parse_sparse_metadata(
    text: &str,
) -> std::result::Result<BTreeMap<String, (Dtype, Vec<usize>)>, String> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| format!("{SPARSE_METADATA_KEY} is not JSON: {e}"))?;
    if doc.get("format").and_then(Value::as_str) != Some(SPARSE_FORMAT) {
        return Err(format!(
            "{SPARSE_METADATA_KEY} format must be {SPARSE_FORMAT:?}, got {}",
            doc.get("format").unwrap_or(&Value::Null)
        ));
    }
    let Some(Value::Object(tensors)) = doc.get("tensors") else {
        return Err(format!("{SPARSE_METADATA_KEY} has no `tensors` object"));
    };
    let mut out = BTreeMap::new();
    for (name, entry) in tensors {
        let dtype: Dtype = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{SPARSE_METADATA_KEY}: {name} has no dtype"))?
            .parse()
            .map_err(|e| format!("{SPARSE_METADATA_KEY}: {name}: {e}"))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| format!("{SPARSE_METADATA_KEY}: {name} has no valid shape"))?;
        out.insert(name.clone(), (dtype, shape));
    }
    Ok(out)
}

pub(super) fn unpack(
    file: &SafetensorsFile,
    mask: &TensorInfo,
    base: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<NamedTensor> {
    let bad = |m: String| Error::InvalidSafetensors(format!("packed tensor {base}: {m}"));
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let bits = file.bytes(mask);
    if mask.dtype != Dtype::U8 || bits.len() != mask_len(n) {
        return Err(bad(format!(
            "the mask must be U8 with {} bytes for shape {shape:?}, found {} {:?}",
            mask_len(n),
            mask.dtype,
            mask.shape
        )));
    }
    if n % 8 != 0 && bits.last().is_some_and(|&b| b >> (n % 8) != 0) {
        return Err(bad("the mask's padding bits are not zero".into()));
    }
    let vname = format!("{base}{VALUES_SUFFIX}");
    let vinfo = file
        .get(&vname)
        .ok_or_else(|| bad(format!("{vname} is missing")))?;
    let kept = count_ones(bits);
    if vinfo.dtype != dtype || vinfo.numel() as u64 != kept {
        return Err(bad(format!(
            "the mask keeps {kept} elements but {vname} is {} {:?} (expected {dtype})",
            vinfo.dtype, vinfo.shape
        )));
    }
    let kept_values = file.to_f32(vinfo)?;
    let mut values = vec![0f32; n];
    let mut next = kept_values.iter();
    for (i, v) in values.iter_mut().enumerate() {
        if bit(bits, i) {
            *v = *next.next().ok_or_else(|| bad("too few values".into()))?;
        }
    }
    Ok(NamedTensor {
        name: base.to_owned(),
        shape: shape.to_vec(),
        values,
    })
}
