//! Calibration-based compression: GPTQ, AWQ, SparseGPT and Wanda (and the importance matrix),
//! driven by statistics of each linear layer's inputs gathered through the real network.
//!
//! Layers are processed in the network's own order, in *groups* of consecutive layers that
//! read the same input (a llama block's `q`/`k`/`v` projections, its `gate`/`up`): each group's
//! statistics are gathered with every group before it already compressed, so it sees the
//! inputs the compressed network really produces (GPTQ's "sequential" mode). Transformers run
//! block by block ([`BlockRunner`]): the calibration batches' hidden states at the current
//! block are kept and each group is measured by running that block alone. Other networks run
//! whole, each pass stopped right after the group's last layer has read its input. Memory holds
//! one layer's Gram matrix at a time.
//!
//! This module holds what the methods share: the calibration draw, the input statistics
//! (Σx², Σ|x| per column and the Gram matrix Σxxᵀ), the in-order sweep, the upper Cholesky
//! factor of the damped inverse Hessian, and the output error `tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`
//! every report uses. The methods themselves are [`crate::compress::quant::gptq`],
//! [`crate::compress::quant::awq`] and [`crate::compress::prune::calibrated`].

use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::compress::engine::data::{text_batch, Batch, Dataset, Subset};
use crate::compress::engine::{BlockRunner, BlockState, Family, LayerInput, Network, ProbeFn};
use crate::compress::parallel::par_units_of_work;
use crate::compress::progress::Ctx;
use crate::compress::{Error, Result};

/// What to draw from the calibration dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibrationParams {
    /// Samples: windows of a llama model's token stream, documents for a bert model, rows
    /// of a tensor dataset.
    pub samples: usize,
    /// Tokens per window (llama) or the most tokens kept per document (bert).
    pub seq_len: usize,
    /// Seed of the draw.
    pub seed: u64,
}

/// The drawn calibration batches and what was drawn (for the job's report).
#[derive(Debug)]
pub struct CalibrationSet {
    /// The batches, in order.
    pub batches: Vec<Batch>,
    /// Samples drawn.
    pub samples: usize,
    /// Tokens in all (text), 0 for tensor datasets.
    pub tokens: usize,
    /// What each sample is: stream offsets of llama windows, document or row indices.
    pub indices: Vec<usize>,
    /// `windows` (llama), `documents` (bert) or `rows` (tensors).
    pub kind: &'static str,
}

/// Windows of a llama calibration batch.
const WINDOWS_PER_BATCH: usize = 4;
/// Rows of a tensor calibration batch.
const ROWS_PER_BATCH: usize = 64;

/// Draws the calibration set of `net` from `data`, reproducibly from `p.seed`: for a llama
/// model `samples` windows of `seq_len` tokens at random offsets of the tokenized documents
/// (joined as the evaluation joins them); for a bert model `samples` documents, each cut to
/// `seq_len` tokens and run alone (no padding enters the statistics); for a sequential
/// network `samples` rows.
pub fn calibration_set(
    net: &dyn Network,
    data: &Dataset,
    p: &CalibrationParams,
) -> Result<CalibrationSet> {
    if p.samples == 0 || p.seq_len < 2 {
        return Err(Error::invalid(
            "calibration",
            "needs at least 1 sample and a seq_len of at least 2",
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    match (net.text_input(), data.documents()) {
        (Some(text), Some(docs)) if net.family() == Family::Llama => {
            let stream = text.encoder.encode_stream(docs)?;
            let len = p.seq_len.min(text.max_len).min(stream.len());
            if len < 2 {
                return Err(Error::InvalidDataset(format!(
                    "the calibration text holds {} tokens; at least 2 are needed",
                    stream.len()
                )));
            }
            let offsets: Vec<usize> = (0..p.samples)
                .map(|_| rng.gen_range(0..=stream.len() - len))
                .collect();
            let mut batches = Vec::new();
            for chunk in offsets.chunks(WINDOWS_PER_BATCH) {
                let ids: Vec<u32> = chunk
                    .iter()
                    .flat_map(|&o| stream[o..o + len].iter().copied())
                    .collect();
                batches.push(Batch {
                    x: Tensor::from_vec(ids, (chunk.len(), len), &Device::Cpu)?,
                    mask: None,
                    segments: None,
                    y: None,
                    labels: None,
                    len: chunk.len(),
                    indices: chunk.to_vec(),
                });
            }
            Ok(CalibrationSet {
                batches,
                samples: offsets.len(),
                tokens: offsets.len() * len,
                indices: offsets,
                kind: "windows",
            })
        }
        (Some(text), Some(docs)) => {
            let indices = draw(docs.len(), p.samples, &mut rng);
            let mut batches = Vec::new();
            let mut tokens = 0;
            for &i in &indices {
                let encoded = text.encoder.encode(&docs[i], p.seq_len.min(text.max_len))?;
                tokens += encoded.ids.len();
                batches.push(text_batch(&[encoded], text.pad_id, None, vec![i])?);
            }
            Ok(CalibrationSet {
                batches,
                samples: indices.len(),
                tokens,
                indices,
                kind: "documents",
            })
        }
        (Some(_), None) => Err(Error::DatasetMismatch(
            "a transformer calibrates on a text dataset (format `text` or `jsonl`)".into(),
        )),
        (None, Some(_)) => Err(Error::DatasetMismatch(
            "a text dataset calibrates a transformer (bert or llama); this model is a sequential network".into(),
        )),
        (None, None) => {
            let indices = draw(data.samples, p.samples, &mut rng);
            let subset = Subset {
                dataset: data,
                indices: indices.clone(),
            };
            let batches = subset
                .batches(ROWS_PER_BATCH)
                .collect::<Result<Vec<_>>>()?;
            Ok(CalibrationSet {
                batches,
                samples: indices.len(),
                tokens: 0,
                indices,
                kind: "rows",
            })
        }
    }
}

/// `k` distinct indices below `n` in random order (all of them when `k ≥ n`).
fn draw(n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(rng);
    all.truncate(k.min(n));
    all
}

/// Consecutive linear layers that read the same input, in network order.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Layer names (`{layer}.weight` is the weight).
    pub layers: Vec<String>,
    /// Input features (columns of each weight).
    pub cols: usize,
    /// Kernel window of a convolution (1 for a linear layer).
    pub window: usize,
}

/// The groups of `net` as `batch` runs through it: each layer's input is fingerprinted
/// (shape, Σx, Σx²) and consecutive layers with the same fingerprint form one group.
pub fn discover_groups(net: &dyn Network, batch: &Batch) -> Result<Vec<Group>> {
    groups_of(|probe| net.forward_probed(batch, probe).map(|_| ()))
}

type Run<'r> = dyn FnMut(&mut ProbeFn<'_>) -> Result<()> + 'r;

/// What a method does with one group: the new values of its weights, by name.
pub type Solve<'s> = dyn FnMut(&Group, &InputStats) -> Result<Vec<(String, Vec<f32>)>> + 's;

fn groups_of(mut run: impl FnMut(&mut ProbeFn<'_>) -> Result<()>) -> Result<Vec<Group>> {
    let mut seen: Vec<(String, Vec<usize>, f64, f64, usize)> = Vec::new();
    run(&mut |input: LayerInput<'_>| {
        let x = input.x;
        let sum = x.sum_all()?.to_scalar::<f32>()? as f64;
        let sq = x.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        seen.push((
            input.layer.to_string(),
            x.dims().to_vec(),
            sum,
            sq,
            input.window,
        ));
        Ok(())
    })?;
    let mut groups: Vec<Group> = Vec::new();
    let mut last: Option<(Vec<usize>, f64, f64)> = None;
    for (layer, dims, sum, sq, window) in seen {
        let key = (dims.clone(), sum, sq);
        let cols = dims.get(1).copied().unwrap_or(0) * window;
        match (&last, groups.last_mut()) {
            (Some(k), Some(g)) if *k == key && window == 1 => g.layers.push(layer),
            _ => groups.push(Group {
                layers: vec![layer],
                cols,
                window,
            }),
        }
        last = Some(key);
    }
    Ok(groups)
}

/// Statistics of one group's input over the calibration set.
#[derive(Debug, Clone)]
pub struct InputStats {
    /// Input features.
    pub cols: usize,
    /// Rows (tokens or samples) seen.
    pub rows: usize,
    /// Σ x² per column.
    pub sum_sq: Vec<f64>,
    /// Σ |x| per column.
    pub sum_abs: Vec<f64>,
    /// Σ x xᵀ, `cols × cols` row-major, over the first `gram_rows` rows.
    pub gram: Vec<f64>,
    /// Rows in `gram`: all of them, unless the sweep measured the Gram matrix on its first
    /// rows only ([`sweep`]'s `gram_rows`).
    pub gram_rows: usize,
}

impl InputStats {
    fn new(cols: usize) -> Self {
        Self {
            cols,
            rows: 0,
            sum_sq: vec![0.0; cols],
            sum_abs: vec![0.0; cols],
            gram: vec![0.0; cols * cols],
            gram_rows: 0,
        }
    }

    /// Adds the rows of `x` `[n, cols]`: to the column sums always, to the Gram matrix with
    /// `gram`.
    fn add(&mut self, x: &Tensor, gram: bool) -> Result<()> {
        let (n, cols) = x.dims2()?;
        if cols != self.cols {
            return Err(Error::Internal(format!(
                "calibration input of {cols} features where {} were seen",
                self.cols
            )));
        }
        let x = x.contiguous()?;
        if gram {
            self.add_gram(&x)?;
            self.gram_rows += n;
        }
        let sq = x.sqr()?.sum(0)?.to_vec1::<f32>()?;
        for (a, v) in self.sum_sq.iter_mut().zip(sq) {
            *a += f64::from(v);
        }
        let abs = x.abs()?.sum(0)?.to_vec1::<f32>()?;
        for (a, v) in self.sum_abs.iter_mut().zip(abs) {
            *a += f64::from(v);
        }
        self.rows += n;
        Ok(())
    }

    /// Σ xxᵀ of contiguous `x`, added to `gram`. It is symmetric: only the tiles on and above
    /// the diagonal are multiplied (at most GRAM_TILE columns each) and mirrored below it.
    fn add_gram(&mut self, x: &Tensor) -> Result<()> {
        let cols = self.cols;
        let tiles = cols.div_ceil(GRAM_TILE).max(1);
        let width = cols.div_ceil(tiles);
        let parts: Vec<(usize, Tensor)> = (0..cols)
            .step_by(width)
            .map(|c0| Ok((c0, x.narrow(1, c0, width.min(cols - c0))?)))
            .collect::<Result<_>>()?;
        for (i, (r0, a)) in parts.iter().enumerate() {
            let at = a.t()?;
            for (c0, b) in &parts[i..] {
                let block = at.matmul(b)?;
                let (h, w) = block.dims2()?;
                let values = block.flatten_all()?.to_vec1::<f32>()?;
                for r in 0..h {
                    for c in 0..w {
                        let v = f64::from(values[r * w + c]);
                        self.gram[(r0 + r) * cols + c0 + c] += v;
                        if c0 != r0 {
                            self.gram[(c0 + c) * cols + r0 + r] += v;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The Hessian of the layer-wise squared error, `2·Σxxᵀ / rows` (GPTQ's `H`).
    pub fn hessian(&self) -> Vec<f64> {
        let s = 2.0 / self.gram_rows.max(1) as f64;
        self.gram.iter().map(|g| g * s).collect()
    }

    /// mean |x_j| per column (AWQ's activation magnitude).
    pub fn mean_abs(&self) -> Vec<f64> {
        let n = self.rows.max(1) as f64;
        self.sum_abs.iter().map(|s| s / n).collect()
    }

    /// ‖x_j‖₂ per column over all rows (Wanda's activation norm).
    pub fn column_norms(&self) -> Vec<f64> {
        self.sum_sq.iter().map(|s| s.sqrt()).collect()
    }
}

const STOP: &str = "calibration: the group's inputs are gathered";

/// Most columns of one tile of a Gram matrix's product (see [`InputStats::add_gram`]).
const GRAM_TILE: usize = 256;

/// Where a sweep of a network with blocks starts, and what it calls after each block.
pub struct Blocks<'a> {
    /// Blocks already done by an earlier run whose weights `net` holds: their hidden states
    /// are recomputed with those weights and their groups are not solved again.
    pub start: usize,
    /// Called with the number of blocks done after each block's groups are installed (a
    /// checkpoint); not called for networks that run whole.
    pub done: &'a mut dyn FnMut(usize) -> Result<()>,
}

/// Runs `solve` on every group holding a selected weight, in network order. `solve` gets the
/// group and its input statistics (gathered with every earlier group already replaced) and
/// returns the new values of weights (`{layer}.weight`, same shape), which are installed in
/// `net` before the next group is measured. Reports progress per group. `gram_rows`: measure
/// the Gram matrix (the Hessian) on the first batches holding at least that many rows only,
/// for a method that needs only the column sums and reports its output error with it (the
/// Gram products cost about half of a block's); `None`: on every batch.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    net: &dyn Network,
    set: &CalibrationSet,
    selected: &HashSet<String>,
    ctx: &Ctx,
    blocks: Blocks<'_>,
    gram_rows: Option<usize>,
    mut solve: impl FnMut(&Group, &InputStats) -> Result<Vec<(String, Vec<f32>)>>,
) -> Result<()> {
    let Some(first) = set.batches.first() else {
        return Err(Error::InvalidDataset(
            "the calibration draw is empty".into(),
        ));
    };
    let wanted = |g: &Group| {
        g.layers
            .iter()
            .any(|l| selected.contains(&format!("{l}.weight")))
    };
    if let Some(runner) = net.block_runner() {
        return sweep_blocks(
            net, runner, set, &wanted, ctx, blocks, gram_rows, &mut solve,
        );
    }
    if blocks.start != 0 {
        return Err(Error::Internal(
            "a network without blocks resumes no sweep".into(),
        ));
    }
    sweep_whole(net, first, set, &wanted, ctx, gram_rows, &mut solve)
}

/// The sweep of a network run whole: each group's passes run the network from its input
/// and stop after the group.
pub(crate) fn sweep_whole(
    net: &dyn Network,
    first: &Batch,
    set: &CalibrationSet,
    wanted: &dyn Fn(&Group) -> bool,
    ctx: &Ctx,
    gram_rows: Option<usize>,
    solve: &mut Solve<'_>,
) -> Result<()> {
    let groups: Vec<Group> = discover_groups(net, first)?
        .into_iter()
        .filter(|g| wanted(g))
        .collect();
    for (gi, group) in groups.iter().enumerate() {
        ctx.report(
            gi as f64 / groups.len() as f64,
            &format!("calibrating {}", group.layers.join(", ")),
        );
        let mut runs: Vec<Box<Run<'_>>> = set
            .batches
            .iter()
            .map(|b| {
                Box::new(move |p: &mut ProbeFn<'_>| net.forward_probed(b, p).map(|_| ()))
                    as Box<Run<'_>>
            })
            .collect();
        let stats = gather(group, None, &mut runs, ctx, gram_rows)?;
        for (name, values) in solve(group, &stats)? {
            set_weight(net, &name, values)?;
        }
    }
    ctx.report(1.0, "calibrated");
    Ok(())
}

/// The sweep of a network that runs block by block: the calibration batches' hidden states at
/// the current block are kept, and each block runs in its stages ([`BlockRunner::run_stage`]):
/// the groups of a stage are measured from the stage's input (each pass stops at the group's
/// first layer), solved and installed, then the stage runs once with its new weights and the
/// states move past it. Every operation of a block thus runs once per batch, with the weights
/// a re-run of the whole block would use, so results equal those of the whole network.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sweep_blocks(
    net: &dyn Network,
    runner: &dyn BlockRunner,
    set: &CalibrationSet,
    wanted: &dyn Fn(&Group) -> bool,
    ctx: &Ctx,
    control: Blocks<'_>,
    gram_rows: Option<usize>,
    solve: &mut Solve<'_>,
) -> Result<()> {
    let mut states: Vec<BlockState> = set
        .batches
        .iter()
        .map(|b| runner.embed(b))
        .collect::<Result<_>>()?;
    let blocks = runner.num_blocks();
    for block in 0..blocks {
        ctx.check()?;
        if block < control.start {
            states = states
                .iter()
                .map(|s| runner.run_block(block, s, &mut |_| Ok(())))
                .collect::<Result<_>>()?;
            continue;
        }
        for stage in 0..runner.num_stages(block) {
            // One run of the first batch finds the stage's groups and keeps every layer's
            // input: the first group solved takes its first batch from there.
            let mut first_inputs: HashMap<String, Tensor> = HashMap::new();
            let groups: Vec<Group> = groups_of(|p| {
                runner
                    .run_stage(block, stage, &states[0], &mut |input: LayerInput<'_>| {
                        first_inputs
                            .entry(input.layer.to_string())
                            .or_insert_with(|| input.x.clone());
                        p(input)
                    })
                    .map(|_| ())
            })?
            .into_iter()
            .filter(|g| wanted(g))
            .collect();
            for (gi, group) in groups.iter().enumerate() {
                ctx.report(
                    block as f64 / blocks as f64,
                    &format!("calibrating {}", group.layers.join(", ")),
                );
                // Until a group of the stage is solved, the first batch's inputs still hold.
                let first = if gi == 0 {
                    first_inputs.remove(&group.layers[0])
                } else {
                    None
                };
                let mut runs: Vec<Box<Run<'_>>> = states
                    .iter()
                    .skip(usize::from(first.is_some()))
                    .map(|s| {
                        Box::new(move |p: &mut ProbeFn<'_>| {
                            runner.run_stage(block, stage, s, p).map(|_| ())
                        }) as Box<Run<'_>>
                    })
                    .collect();
                let stats = gather(group, first.as_ref(), &mut runs, ctx, gram_rows)?;
                drop(runs);
                for (name, values) in solve(group, &stats)? {
                    set_weight(net, &name, values)?;
                }
            }
            drop(first_inputs);
            ctx.check()?;
            states = states
                .iter()
                .map(|s| runner.run_stage(block, stage, s, &mut |_| Ok(())))
                .collect::<Result<_>>()?;
        }
        (control.done)(block + 1)?;
    }
    ctx.report(1.0, "calibrated");
    Ok(())
}

/// The input statistics of `group`: `first` (an input already seen, if any) then every run's
/// (each stopped when the group's first layer reads its input: the group's layers all read
/// that input).
fn gather(
    group: &Group,
    first: Option<&Tensor>,
    runs: &mut [Box<Run<'_>>],
    ctx: &Ctx,
    gram_rows: Option<usize>,
) -> Result<InputStats> {
    if group.window != 1 {
        return Err(Error::Unsupported(format!(
            "layer {:?} is a convolution; calibrated methods handle linear layers (exclude it, or prune it with `magnitude`)",
            group.layers[0]
        )));
    }
    let mut stats = InputStats::new(group.cols);
    // The Gram matrix of whole batches until `gram_rows` rows are in it.
    let gram = |st: &InputStats| gram_rows.is_none_or(|n| st.gram_rows < n);
    if let Some(x) = first {
        stats.add(x, gram(&stats))?;
    }
    let head = &group.layers[0];
    for run in runs.iter_mut() {
        ctx.check()?;
        let result = run(&mut |input: LayerInput<'_>| {
            if input.layer == head {
                stats.add(input.x, gram(&stats))?;
                return Err(Error::Internal(STOP.into()));
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(Error::Internal(m)) if m == STOP => {}
            Err(e) => return Err(e),
        }
    }
    Ok(stats)
}

/// The mean square of every input feature of every linear layer over the calibration set
/// (llama.cpp's importance matrix), keyed by the layers' weight names: one pass of the
/// network per batch.
pub fn input_mean_squares(
    net: &dyn Network,
    set: &CalibrationSet,
    ctx: &Ctx,
) -> Result<std::collections::HashMap<String, Vec<f32>>> {
    let mut sums: std::collections::HashMap<String, (Vec<f64>, usize)> = Default::default();
    for (i, batch) in set.batches.iter().enumerate() {
        ctx.check()?;
        ctx.report(
            i as f64 / set.batches.len() as f64,
            "measuring input importance",
        );
        net.forward_probed(batch, &mut |input: LayerInput<'_>| {
            let x = input.x;
            let [n, _] = x.dims() else {
                return Ok(()); // convolutions: measured by the sequential path
            };
            let n = *n;
            let sq = x.sqr()?.sum(0)?.to_vec1::<f32>()?;
            let entry = sums
                .entry(format!("{}.weight", input.layer))
                .or_insert_with(|| (vec![0.0; sq.len()], 0));
            for (a, v) in entry.0.iter_mut().zip(sq) {
                *a += f64::from(v);
            }
            entry.1 += n;
            Ok(())
        })?;
    }
    Ok(sums
        .into_iter()
        .map(|(k, (s, n))| {
            let n = n.max(1) as f64;
            (k, s.iter().map(|v| (v / n) as f32).collect())
        })
        .collect())
}

/// The values of the parameter `name` of `net`.
pub fn weight(net: &dyn Network, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let p = net
        .params()
        .iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| Error::Internal(format!("no parameter {name}")))?;
    let t = p.var().as_tensor();
    Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
}

/// Replaces the values of the parameter `name` of `net` (same shape).
pub fn set_weight(net: &dyn Network, name: &str, values: Vec<f32>) -> Result<()> {
    let p = net
        .params()
        .iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| Error::Internal(format!("no parameter {name}")))?;
    let shape = p.var().as_tensor().dims().to_vec();
    p.var()
        .set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
    Ok(())
}

/// Cholesky factor `L` (lower, row-major) of the symmetric positive definite `a` (`n × n`),
/// in place; `false` when `a` is not positive definite.
fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let d = a[j * n + j] - a[j * n..j * n + j].iter().map(|v| v * v).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        // The rows below are independent given row j: split over the worker pool, each
        // computed exactly as on one thread.
        let (top, bottom) = a.split_at_mut((j + 1) * n);
        let row_j = &top[j * n..j * n + j];
        par_units_of_work(bottom, n, (n - j) * j, |_, rows| {
            for row_i in rows.chunks_mut(n) {
                let s = row_i[j]
                    - row_i[..j]
                        .iter()
                        .zip(row_j)
                        .map(|(x, y)| x * y)
                        .sum::<f64>();
                row_i[j] = s / d;
            }
        });
    }
    for i in 0..n {
        for j in i + 1..n {
            a[i * n + j] = 0.0;
        }
    }
    true
}

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ·U`), row-major `n × n`: what GPTQ and
/// SparseGPT read their error propagation from. With `J` the reversal, `J·H·J = K·Kᵀ` gives
/// `H = R·Rᵀ` for the upper `R = J·K·J`, so `H⁻¹ = R⁻ᵀ·R⁻¹` and `U = R⁻¹ = J·K⁻¹·J`.
pub fn inverse_hessian_upper(h: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut k = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            k[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    if !cholesky_lower(&mut k, n) {
        return None;
    }
    // K⁻¹ column by column, stored transposed (row j of `xt` is column j of K⁻¹), so the
    // inner sums read two rows.
    // The columns are independent: split over the worker pool.
    let mut xt = vec![0.0; n * n];
    par_units_of_work(&mut xt, n, n * n * n / 6, |first, rows| {
        for (r, row) in rows.chunks_mut(n).enumerate() {
            let j = first + r;
            row[j] = 1.0 / k[j * n + j];
            for i in j + 1..n {
                let s: f64 = k[i * n + j..i * n + i]
                    .iter()
                    .zip(&row[j..i])
                    .map(|(a, b)| a * b)
                    .sum();
                row[i] = -s / k[i * n + i];
            }
        }
    });
    // U[a][b] = K⁻¹[n−1−a][n−1−b] = xt[n−1−b][n−1−a].
    let mut u = vec![0.0; n * n];
    for a in 0..n {
        for b in a..n {
            u[a * n + b] = xt[(n - 1 - b) * n + (n - 1 - a)];
        }
    }
    if u.iter().all(|v| v.is_finite()) {
        Some(u)
    } else {
        None
    }
}

/// Damps `h` in place (`λ = damp · mean(diag)` added to the diagonal; dead columns, whose
/// input is always 0, get 1) and returns the upper factor of its inverse, raising the damping
/// tenfold up to three times if `h` is still not positive definite. Also returns the damping
/// fraction used and the dead columns.
pub fn damped_inverse(h: &mut [f64], n: usize, damp: f64) -> Result<(Vec<f64>, f64, Vec<usize>)> {
    let mut dead = Vec::new();
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
            dead.push(i);
        }
    }
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mut frac = damp;
    let mut added = 0.0;
    for _ in 0..4 {
        let lambda = frac * mean;
        for i in 0..n {
            h[i * n + i] += lambda - added;
        }
        added = lambda;
        if let Some(u) = inverse_hessian_upper(h, n) {
            return Ok((u, frac, dead));
        }
        frac *= 10.0;
    }
    Err(Error::Unsupported(
        "the calibration Hessian is not positive definite even with 10× damping; use more calibration samples".into(),
    ))
}

/// The Gram matrix as the f32 tensor [`output_energy`] multiplies with.
pub fn gram_tensor(gram: &[f64], cols: usize) -> Result<Tensor> {
    let g: Vec<f32> = gram.iter().map(|v| *v as f32).collect();
    Ok(Tensor::from_vec(g, (cols, cols), &Device::Cpu)?)
}

/// `tr(W·G·Wᵀ)` of row-major `w` `[rows, cols]`: the energy of the layer's output (or, for a
/// difference of weights, of its error) on the inputs whose Gram matrix is `gram`; f32 matrix
/// products (a report and search figure: about 6 significant digits).
pub fn output_energy(w: &[f32], gram: &Tensor, cols: usize) -> Result<f64> {
    let t = Tensor::from_slice(w, (w.len() / cols.max(1), cols), &Device::Cpu)?;
    Ok(f64::from(
        t.matmul(gram)?.mul(&t)?.sum_all()?.to_scalar::<f32>()?,
    ))
}

/// `tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`: the squared error of the layer's output on the calibration
/// inputs relative to the output's own energy (`H` the Gram matrix or any multiple of it).
pub fn relative_output_error(original: &[f32], changed: &[f32], gram: &[f64], cols: usize) -> f64 {
    let delta: Vec<f32> = original.iter().zip(changed).map(|(a, b)| a - b).collect();
    let ratio = || -> Result<f64> {
        let g = gram_tensor(gram, cols)?;
        Ok((
            output_energy(&delta, &g, cols)?,
            output_energy(original, &g, cols)?,
        ))
        .map(|(num, den)| if den > 0.0 { num / den } else { 0.0 })
    };
    ratio().unwrap_or(0.0)
}

/// Test support: GPTQ (3 bits) through the block-by-block sweep and through whole-network
/// runs of two fresh copies of a network must give bit-identical weights and the same groups;
/// returns the number of groups.
#[cfg(test)]
pub(crate) fn assert_blockwise_equals_whole<N: Network + BlockRunner>(
    make: impl Fn() -> N,
    set: &CalibrationSet,
    p: &crate::compress::quant::gptq::GptqParams,
) -> usize {
    use crate::compress::quant::gptq::gptq;
    use std::sync::atomic::AtomicBool;
    let cancel = AtomicBool::new(false);
    let quiet = |_: f64, _: &str| {};
    let ctx = Ctx::new(&quiet, &cancel);
    // `resume`: weights after the first block, from which a second sweep starts.
    let run =
        |blockwise: bool,
         resume: Option<&Vec<crate::compress::formats::safetensors::NamedTensor>>| {
            let net = make();
            if let Some(w) = resume {
                net.load(w).unwrap();
            }
            let mut after_first = None;
            let mut seen = Vec::new();
            let mut solve = |g: &Group, st: &InputStats| {
                seen.push((g.layers.clone(), st.rows));
                let mut out = Vec::new();
                for l in &g.layers {
                    let name = format!("{l}.weight");
                    let (shape, w) = weight(&net, &name)?;
                    out.push((
                        name,
                        gptq(&w, shape[0], shape[1], &st.hessian(), p)?.weights,
                    ));
                }
                Ok(out)
            };
            let all = |_: &Group| true;
            if blockwise {
                let mut done = |b: usize| {
                    if b == 1 {
                        after_first = Some(net.export()?);
                    }
                    Ok(())
                };
                let control = Blocks {
                    start: usize::from(resume.is_some()),
                    done: &mut done,
                };
                sweep_blocks(&net, &net, set, &all, &ctx, control, None, &mut solve).unwrap();
            } else {
                sweep_whole(&net, &set.batches[0], set, &all, &ctx, None, &mut solve).unwrap();
            }
            (net.export().unwrap(), seen, after_first)
        };
    let (a, groups_a, after_first) = run(true, None);
    let (b, groups_b, _) = run(false, None);
    // Resumed after the first block from its weights: the same result.
    let (c, _, _) = run(true, after_first.as_ref());
    assert_eq!(groups_a, groups_b);
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        assert_eq!(x.name, y.name);
        assert!(x.values == y.values, "{} differs", x.name);
        assert!(x.values == z.values, "{} differs after resuming", x.name);
    }
    groups_a.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a: Vec<f64> = (0..n * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..n).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>();
            }
            h[i * n + i] += 0.1;
        }
        h
    }

    #[test]
    fn the_gram_matrix_can_stop_after_its_first_rows() {
        use std::sync::atomic::AtomicBool;
        let cancel = AtomicBool::new(false);
        let quiet = |_: f64, _: &str| {};
        let ctx = Ctx::new(&quiet, &cancel);
        let group = Group {
            layers: vec!["a".into(), "b".into()],
            cols: 3,
            window: 1,
        };
        let x =
            Tensor::from_vec((1..=12).map(|v| v as f32).collect(), (4, 3), &Device::Cpu).unwrap();
        let run = |x: Tensor| {
            Box::new(move |p: &mut ProbeFn<'_>| {
                for layer in ["a", "b"] {
                    p(LayerInput {
                        index: 0,
                        layer,
                        window: 1,
                        x: &x,
                    })?;
                }
                Ok(())
            }) as Box<Run<'_>>
        };
        for (limit, gram_rows) in [(None, 16), (Some(6), 8), (Some(4), 4)] {
            let mut runs = vec![run(x.clone()), run(x.clone()), run(x.clone())];
            let stats = gather(&group, Some(&x), &mut runs, &ctx, limit).unwrap();
            assert_eq!((stats.rows, stats.gram_rows), (16, gram_rows));
            // Column sums over every row; the Gram matrix over its own.
            let col0: f64 = [1.0f64, 4.0, 7.0, 10.0].iter().map(|v| v * v).sum();
            assert_eq!(stats.sum_sq[0], 4.0 * col0);
            assert_eq!(stats.gram[0], (gram_rows / 4) as f64 * col0);
            assert_eq!(stats.hessian()[0], 2.0 * col0 / 4.0);
        }
    }

    #[test]
    fn the_gram_matrix_from_tiles_equals_the_full_product() {
        for (n, cols) in [(5, 7), (33, 300), (9, 600)] {
            let mut rng = ChaCha8Rng::seed_from_u64(cols as u64);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let t = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
            let mut stats = InputStats::new(cols);
            stats.add(&t, true).unwrap();
            stats.add(&t, true).unwrap();
            stats.add(&t, false).unwrap();
            assert_eq!((stats.rows, stats.gram_rows), (3 * n, 2 * n));
            for i in 0..cols {
                for j in 0..cols {
                    let exact: f64 = (0..n)
                        .map(|r| f64::from(x[r * cols + i]) * f64::from(x[r * cols + j]))
                        .sum::<f64>()
                        * 2.0;
                    let got = stats.gram[i * cols + j];
                    assert!(
                        (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                        "{cols}: ({i}, {j}) {got} vs {exact}"
                    );
                }
                let sq = 1.5 * stats.gram[i * cols + i];
                assert!(
                    (stats.sum_sq[i] - sq).abs() < 1e-4 * (1.0 + sq),
                    "{cols}: {i}"
                );
            }
        }
    }

    #[test]
    fn upper_factor_of_the_inverse_reproduces_the_inverse() {
        let n = 7;
        let h = spd(n, 1);
        let u = inverse_hessian_upper(&h, n).unwrap();
        // Uᵀ·U·H = I, and U is upper triangular.
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        let mut inv = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                inv[i * n + j] = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
            }
        }
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|k| inv[i * n + k] * h[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((p - want).abs() < 1e-9, "({i},{j}) {p}");
            }
        }
    }

    #[test]
    fn not_positive_definite_is_refused_then_damped() {
        let n = 3;
        let mut h = vec![1.0; n * n]; // rank 1
        assert!(inverse_hessian_upper(&h, n).is_none());
        let (_, frac, dead) = damped_inverse(&mut h, n, 0.01).unwrap();
        assert_eq!(frac, 0.01);
        assert!(dead.is_empty());
        let mut zero = vec![0.0; 4];
        let (_, _, dead) = damped_inverse(&mut zero, 2, 0.01).unwrap();
        assert_eq!(dead, vec![0, 1]);
    }

    #[test]
    fn output_error_is_zero_for_no_change_and_one_for_zeroing() {
        let h = spd(4, 2);
        let w: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        assert_eq!(relative_output_error(&w, &w, &h, 4), 0.0);
        let z = vec![0f32; 8];
        assert!((relative_output_error(&w, &z, &h, 4) - 1.0).abs() < 1e-6);
    }
}
