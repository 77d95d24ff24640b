//! Pruning streamed file → file, and the writer of the sparse `bitmask-v1` encoding.

#[allow(unused_imports)]
use super::*;

// Streamed file → file.

/// What [`prune_file`] does.
#[derive(Debug, Clone, Copy)]
pub struct PruneFile<'a> {
    /// The tensors to prune.
    pub selected: &'a [String],
    /// How weights are chosen.
    pub method: Method,
    /// How many, and where.
    pub targets: &'a PruneTargets,
    /// Seed of `random`.
    pub seed: u64,
    /// Zeros in place, or the sparse encoding.
    pub output: Output,
    /// Metadata of the written file.
    pub metadata: &'a BTreeMap<String, String>,
}

/// Prunes the tensors named in `selected` of `input` and streams the result to `out` as
/// `output` (dense zeros in place, or `bitmask-v1`), with `metadata` (plus
/// `whittle.sparse` when sparse). Peak memory is bounded by the largest tensor: the global
/// threshold is found by two histogram passes over the mapped file, then each tensor is
/// decoded, masked and written on its own. Every output tensor keeps its dtype; kept
/// values are bit-exact. Returns one report per selected tensor, in file order.
pub fn prune_file(
    input: &SafetensorsFile,
    job: &PruneFile<'_>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<LayerReport>> {
    let PruneFile {
        selected,
        ref method,
        targets,
        seed,
        output,
        metadata,
    } = *job;
    method.validate()?;
    if !matches!(method, Method::NM { .. }) {
        targets.validate()?;
    }
    let infos = selected_infos(input, selected)?;
    if let Method::NM { m, .. } = method {
        for info in &infos {
            check_nm(&info.name, &info.shape, *m)?;
        }
    }
    ctx.report(0.0, "planning");
    let rules: Vec<Rule> = match method {
        Method::Magnitude => {
            let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
            let srcs: Vec<Src> = infos.iter().map(|i| raw_src(input, i)).collect();
            magnitude_rules(&names, &srcs, targets)?
        }
        Method::Random => infos
            .iter()
            .map(|i| Rule::Random {
                k: prune_count(own_sparsity(targets, &i.name), i.numel() as u64) as usize,
            })
            .collect(),
        Method::NM { n, m } => vec![Rule::NM { n: *n, m: *m }; infos.len()],
        Method::Structured { .. } => return Err(structured_elsewhere()),
    };
    ctx.check()?;
    let plans: Vec<(&TensorInfo, Rule)> = infos.into_iter().zip(rules).collect();
    write_plans(input, &plans, seed, output, metadata, out, ctx)
}

/// Packs the (already pruned) tensors named in `names` of `input` into the `bitmask-v1`
/// encoding, keeping their non-zero elements (zeros of either sign are dropped), and copies
/// the rest. Used after gradual pruning. Returns one report per packed tensor (`pruned` =
/// its zeros).
pub fn encode_sparse(
    input: &SafetensorsFile,
    names: &[String],
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<LayerReport>> {
    let infos = selected_infos(input, names)?;
    let plans: Vec<(&TensorInfo, Rule)> = infos.into_iter().map(|i| (i, Rule::NonZero)).collect();
    write_plans(input, &plans, 0, Output::Sparse, metadata, out, ctx)
}

/// The infos of `selected` in file order; unknown names are a caller bug, non-float
/// tensors are refused.
pub(super) fn selected_infos<'a>(
    input: &'a SafetensorsFile,
    selected: &[String],
) -> Result<Vec<&'a TensorInfo>> {
    let wanted: HashSet<&str> = selected.iter().map(String::as_str).collect();
    let present: HashSet<&str> = input
        .header()
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    if let Some(name) = selected.iter().find(|n| !present.contains(n.as_str())) {
        return Err(Error::Internal(format!(
            "selected tensor {name} is not in the file"
        )));
    }
    let infos: Vec<&TensorInfo> = input
        .header()
        .tensors
        .iter()
        .filter(|t| wanted.contains(t.name.as_str()))
        .collect();
    for info in &infos {
        if !info.dtype.is_float() {
            return Err(Error::UnsupportedDtype {
                tensor: info.name.clone(),
                dtype: info.dtype.as_str().to_owned(),
                expected: "a floating-point dtype (pruning zeroes weights)".to_owned(),
            });
        }
    }
    Ok(infos)
}

pub(super) fn raw_src<'a>(input: &'a SafetensorsFile, info: &'a TensorInfo) -> Src<'a> {
    Src::Raw {
        name: &info.name,
        dtype: info.dtype,
        bytes: input.bytes(info),
    }
}

/// Whether an element's bytes encode ±0 (every bit but the sign, the top bit of the last
/// little-endian byte, is 0).
pub(super) fn is_zero_elem(b: &[u8]) -> bool {
    match b.split_last() {
        Some((last, rest)) => last & 0x7f == 0 && rest.iter().all(|&x| x == 0),
        None => true,
    }
}

/// The keep-bits of one tensor under its rule.
pub(super) fn tensor_bits(
    input: &SafetensorsFile,
    info: &TensorInfo,
    rule: &Rule,
    seed: u64,
) -> Result<Vec<u8>> {
    let n = info.numel();
    Ok(match *rule {
        Rule::Keep => full_mask(n),
        Rule::Threshold { t, cut } => threshold_bits(&input.to_f32(info)?, t, cut),
        Rule::Random { k } => random_bits(&info.name, n, k, seed)?,
        Rule::NM { n: keep, m } => nm_bits(&input.to_f32(info)?, &info.shape, keep, m),
        Rule::NonZero => {
            let es = info.dtype.size_in_bytes();
            let mut bits = vec![0u8; mask_len(n)];
            for (i, e) in input.bytes(info).chunks_exact(es).enumerate() {
                bits[i / 8] |= u8::from(!is_zero_elem(e)) << (i % 8);
            }
            bits
        }
    })
}

/// Kept elements of a tensor under its rule, known before its data is read when possible
/// (the sparse header needs every count up front).
pub(super) fn kept_count(input: &SafetensorsFile, info: &TensorInfo, rule: &Rule) -> Result<u64> {
    let n = info.numel();
    Ok(match *rule {
        Rule::Keep => n as u64,
        Rule::Random { k } => (n - k.min(n)) as u64,
        Rule::NM { n: keep, m } => nm_kept(n, keep, m) as u64,
        Rule::Threshold { t, cut } => {
            let mut kept = 0u64;
            let mut buf = Vec::new();
            raw_src(input, info).visit(0, n, &mut buf, |offset, vals| {
                for (i, &v) in vals.iter().enumerate() {
                    let lim = if offset + i < cut { t + 1 } else { t };
                    kept += u64::from(key(v) >= lim);
                }
            })?;
            kept
        }
        Rule::NonZero => {
            let es = info.dtype.size_in_bytes();
            input
                .bytes(info)
                .chunks_exact(es)
                .filter(|e| !is_zero_elem(e))
                .count() as u64
        }
    })
}

/// What one output tensor is.
pub(super) enum Piece {
    Copy(usize),
    Dense(usize),
    Mask(usize),
    Values,
}

pub(super) fn write_plans(
    input: &SafetensorsFile,
    plans: &[(&TensorInfo, Rule)],
    seed: u64,
    output: Output,
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
    ctx: &Ctx,
) -> Result<Vec<LayerReport>> {
    let tensors = &input.header().tensors;
    let plan_of: HashMap<&str, usize> = plans
        .iter()
        .enumerate()
        .map(|(p, (info, _))| (info.name.as_str(), p))
        .collect();
    let mut specs = Vec::new();
    let mut pieces = Vec::new();
    let mut meta = metadata.clone();
    let mut sparse_doc = serde_json::Map::new();
    for (ti, t) in tensors.iter().enumerate() {
        let Some(&p) = plan_of.get(t.name.as_str()) else {
            specs.push(TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()));
            pieces.push(Piece::Copy(ti));
            continue;
        };
        match output {
            Output::Dense => {
                specs.push(TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()));
                pieces.push(Piece::Dense(p));
            }
            Output::Sparse => {
                ctx.check()?;
                let kept = kept_count(input, t, &plans[p].1)?;
                let kept = usize::try_from(kept)
                    .map_err(|_| Error::Internal("kept count overflows".into()))?;
                specs.push(TensorSpec::new(
                    format!("{}{MASK_SUFFIX}", t.name),
                    Dtype::U8,
                    vec![mask_len(t.numel())],
                ));
                pieces.push(Piece::Mask(p));
                specs.push(TensorSpec::new(
                    format!("{}{VALUES_SUFFIX}", t.name),
                    t.dtype,
                    vec![kept],
                ));
                pieces.push(Piece::Values);
                sparse_doc.insert(
                    t.name.clone(),
                    serde_json::json!({"dtype": t.dtype.as_str(), "shape": t.shape}),
                );
            }
        }
    }
    if output == Output::Sparse {
        let doc =
            serde_json::json!({"format": SPARSE_FORMAT, "tensors": Value::Object(sparse_doc)});
        meta.insert(SPARSE_METADATA_KEY.to_owned(), doc.to_string());
    }
    let mut reports: Vec<Option<LayerReport>> = vec![None; plans.len()];
    let mut pending_values: Option<Vec<u8>> = None;
    let total = pieces.len().max(1) as f64;
    write_safetensors(out, &meta, &specs, |i, w| {
        ctx.check()?;
        match pieces[i] {
            Piece::Copy(ti) => w.write_all(input.bytes(&tensors[ti]))?,
            Piece::Dense(p) | Piece::Mask(p) => {
                let (info, rule) = &plans[p];
                let bits = tensor_bits(input, info, rule, seed)?;
                let es = info.dtype.size_in_bytes();
                let bytes = input.bytes(info);
                let mut nonzero = 0u64;
                let kept = count_ones(&bits);
                if matches!(pieces[i], Piece::Dense(_)) {
                    let mut dense = bytes.to_vec();
                    for (e, o) in dense.chunks_exact_mut(es).enumerate() {
                        if bit(&bits, e) {
                            nonzero += u64::from(!is_zero_elem(o));
                        } else {
                            o.fill(0);
                        }
                    }
                    w.write_all(&dense)?;
                } else {
                    let mut values = Vec::with_capacity(kept as usize * es);
                    for (e, v) in bytes.chunks_exact(es).enumerate() {
                        if bit(&bits, e) {
                            values.extend_from_slice(v);
                            nonzero += u64::from(!is_zero_elem(v));
                        }
                    }
                    w.write_all(&bits)?;
                    pending_values = Some(values);
                }
                let n = info.numel() as u64;
                reports[p] = Some(report(
                    &info.name,
                    &info.shape,
                    info.dtype,
                    n - kept,
                    nonzero,
                    rule.threshold(),
                ));
            }
            Piece::Values => {
                let values = pending_values
                    .take()
                    .ok_or_else(|| Error::Internal("values written before their mask".into()))?;
                w.write_all(&values)?;
            }
        }
        ctx.report(
            (i + 1) as f64 / total,
            &format!("tensor {}/{}", i + 1, pieces.len()),
        );
        Ok(())
    })?;
    reports
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Internal("a selected tensor was not written".into())))
        .collect()
}
