//! The optimizer of the training loop: SGD (momentum, Nesterov, weight decay) and AdamW as
//! fused in-place updates over the parameters' storage, per-parameter learning-rate
//! multipliers, global-norm gradient clipping, gradient accumulation, and the optimizer state
//! a checkpoint carries.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, Tensor, Var};

use crate::compress::engine::Network;
use crate::compress::formats::safetensors::NamedTensor;
use crate::compress::select::glob_match;
use crate::compress::{Error, Result};

/// Which update rule, with its rule-specific settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// Stochastic gradient descent, as `torch.optim.SGD` (dampening 0).
    Sgd {
        /// Momentum factor (0 for plain SGD).
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// Adam with decoupled weight decay, as `torch.optim.AdamW`.
    AdamW {
        /// First-moment decay (PyTorch default 0.9).
        beta1: f64,
        /// Second-moment decay (PyTorch default 0.999).
        beta2: f64,
        /// Denominator term (PyTorch default 1e-8).
        eps: f64,
    },
}

impl Optimizer {
    /// AdamW with PyTorch's default betas and epsilon.
    pub const ADAMW: Optimizer = Optimizer::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };

    /// Names of the per-parameter state slots.
    fn slots(self) -> &'static [&'static str] {
        match self {
            Optimizer::Sgd { momentum, .. } => {
                if momentum == 0.0 {
                    &[]
                } else {
                    &["momentum"]
                }
            }
            Optimizer::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

pub(crate) fn bad_checkpoint(msg: impl std::fmt::Display) -> Error {
    Error::InvalidSafetensors(format!("not a usable training checkpoint: {msg}"))
}

/// One tensor the optimizer updates: a trainable model parameter or a caller's extra
/// variable (a clone of the same candle variable, sharing its storage).
struct Trainable {
    name: String,
    var: Var,
    /// A caller's extra variable rather than a model parameter.
    extra: bool,
}

/// The optimizer's per-parameter state and hyper-parameters.
pub(super) struct OptimizerState {
    rule: Optimizer,
    weight_decay: f64,
    /// The model's trainable parameters (in `Model::params` order), then the extras.
    vars: Vec<Trainable>,
    lr_scale: Vec<f64>,
    /// `slots[s][k]`: slot `s` of trainable tensor `k`.
    slots: Vec<Vec<Vec<f32>>>,
    /// Optimizer steps taken.
    pub(super) step: u64,
}

impl OptimizerState {
    pub(super) fn new(
        model: &dyn Network,
        extra: &[(String, Var)],
        rule: Optimizer,
        weight_decay: f64,
        lr_multipliers: &[(String, f64)],
    ) -> OptimizerState {
        let vars: Vec<Trainable> = model
            .params()
            .iter()
            .filter(|p| p.is_trainable())
            .map(|p| Trainable {
                name: p.name().to_owned(),
                var: p.var().clone(),
                extra: false,
            })
            .chain(extra.iter().map(|(name, var)| Trainable {
                name: name.clone(),
                var: var.clone(),
                extra: true,
            }))
            .collect();
        let lr_scale = vars
            .iter()
            .map(|t| {
                lr_multipliers
                    .iter()
                    .find(|(pat, _)| match t.extra {
                        false => model.matches(pat, &t.name),
                        true => glob_match(pat, &t.name),
                    })
                    .map_or(1.0, |(_, m)| *m)
            })
            .collect();
        let slots = rule
            .slots()
            .iter()
            .map(|_| {
                vars.iter()
                    .map(|t| vec![0f32; t.var.elem_count()])
                    .collect()
            })
            .collect();
        OptimizerState {
            rule,
            weight_decay,
            vars,
            lr_scale,
            slots,
            step: 0,
        }
    }

    pub(super) fn export(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for (s, slot) in self.rule.slots().iter().enumerate() {
            for (k, t) in self.vars.iter().enumerate() {
                out.push(NamedTensor {
                    name: format!("{slot}.{}", t.name),
                    shape: t.var.dims().to_vec(),
                    values: self.slots[s][k].clone(),
                });
            }
        }
        out
    }

    pub(super) fn restore(&mut self, saved: &[NamedTensor], step: u64) -> Result<()> {
        let by_name: BTreeMap<&str, &NamedTensor> =
            saved.iter().map(|t| (t.name.as_str(), t)).collect();
        if by_name.len() != self.rule.slots().len() * self.vars.len() {
            return Err(bad_checkpoint(
                "its optimizer state does not match this optimizer and set of trainable parameters",
            ));
        }
        for (s, slot) in self.rule.slots().iter().enumerate() {
            for (k, t) in self.vars.iter().enumerate() {
                let name = format!("{slot}.{}", t.name);
                match by_name.get(name.as_str()) {
                    Some(t) if t.values.len() == self.slots[s][k].len() => {
                        self.slots[s][k].copy_from_slice(&t.values);
                    }
                    _ => return Err(bad_checkpoint(format!("missing or misshapen {name}"))),
                }
            }
        }
        self.step = step;
        Ok(())
    }

    /// The gradient of every trainable tensor in `grads` (in `vars` order).
    pub(super) fn gradients(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.vars
            .iter()
            .map(|t| grads.get(t.var.as_tensor()).cloned())
            .collect()
    }

    /// One update of every trainable tensor from its gradient (`found`, in `vars` order),
    /// in place.
    pub(super) fn apply(
        &mut self,
        found: &[Option<Tensor>],
        lr: f64,
        clip: Option<f64>,
    ) -> Result<()> {
        let scale = match clip {
            Some(max_norm) => {
                let mut sq = 0f64;
                for g in found.iter().flatten() {
                    sq += with_f32(g, |v| {
                        v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
                    })?;
                }
                let norm = sq.sqrt();
                // torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), at most 1.
                (max_norm / (norm + 1e-6)).min(1.0) as f32
            }
            None => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        for (k, trainable) in self.vars.iter().enumerate() {
            let Some(grad) = &found[k] else { continue };
            let lr = (lr * self.lr_scale[k]) as f32;
            let wd = self.weight_decay as f32;
            let mut slots = self.slots.iter_mut().map(|s| s[k].as_mut_slice());
            let op = match self.rule {
                Optimizer::Sgd { momentum, nesterov } => FusedStep::Sgd {
                    lr,
                    wd,
                    momentum: momentum as f32,
                    nesterov,
                    first: self.step == 1,
                    buf: RefCell::new(slots.next()),
                    scale,
                },
                Optimizer::AdamW { beta1, beta2, eps } => FusedStep::AdamW {
                    lr,
                    wd,
                    beta1: beta1 as f32,
                    beta2: beta2 as f32,
                    eps: eps as f32,
                    bc1: 1.0 - (beta1 as f32).powi(t),
                    bc2_sqrt: (1.0 - (beta2 as f32).powi(t)).sqrt(),
                    m: RefCell::new(slots.next().unwrap_or_default()),
                    v: RefCell::new(slots.next().unwrap_or_default()),
                    scale,
                },
            };
            let grad = grad.contiguous()?;
            trainable.var.as_tensor().inplace_op2(&grad, &op)?;
        }
        Ok(())
    }
}

/// Gradients summed over the batches of one accumulation group.
#[derive(Default)]
pub(super) struct Accumulated {
    sum: Vec<Option<Tensor>>,
    batches: usize,
}

impl Accumulated {
    pub(super) fn add(&mut self, grads: Vec<Option<Tensor>>) -> Result<()> {
        if self.batches == 0 {
            self.sum = grads.into_iter().map(|g| g.map(|g| g.detach())).collect();
        } else {
            for (acc, g) in self.sum.iter_mut().zip(grads) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g.detach())?),
                    (a, g) => a.or(g.map(|g| g.detach())),
                };
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// The mean gradient of the group, leaving it empty.
    pub(super) fn take_mean(&mut self) -> Result<Vec<Option<Tensor>>> {
        let scale = 1.0 / self.batches.max(1) as f64;
        self.batches = 0;
        std::mem::take(&mut self.sum)
            .into_iter()
            .map(|g| g.map(|g| g.affine(scale, 0.0)).transpose())
            .collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }
}

/// Runs `f` over a CPU f32 tensor's elements without copying them.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => Err(Error::Internal(
            "expected a contiguous f32 CPU tensor".into(),
        )),
    }
}

/// Elements per block of a parallel update: below two blocks an update runs inline.
const UPDATE_BLOCK: usize = 1 << 15;

/// A block of a parameter, its gradient and its optimizer slots.
type UpdateBlock<'a> = (&'a mut [f32], &'a [f32], Vec<&'a mut [f32]>);

/// Runs `f` over matching blocks of a parameter `p`, its gradient `g` and its optimizer
/// slots (each as long as `p`), on candle's worker pool when `p` is large (an embedding
/// table). Every element's update depends on that element alone, so the result is the same
/// as one pass.
fn par_zip(
    p: &mut [f32],
    g: &[f32],
    slots: &mut [&mut [f32]],
    f: impl Fn(&mut [f32], &[f32], &mut [&mut [f32]]) + Sync,
) {
    let pool = candle_core::utils::barrier_pool();
    if pool.n_workers() == 0 || p.len() < 2 * UPDATE_BLOCK {
        f(p, g, slots);
        return;
    }
    let mut slot_blocks: Vec<std::slice::ChunksMut<'_, f32>> = slots
        .iter_mut()
        .map(|s| s.chunks_mut(UPDATE_BLOCK))
        .collect();
    let blocks: Vec<std::sync::Mutex<UpdateBlock<'_>>> = p
        .chunks_mut(UPDATE_BLOCK)
        .zip(g.chunks(UPDATE_BLOCK))
        .map(|(pb, gb)| {
            let sb = slot_blocks.iter_mut().filter_map(Iterator::next).collect();
            std::sync::Mutex::new((pb, gb, sb))
        })
        .collect();
    pool.execute_chunked(blocks.len(), |range| {
        for i in range {
            // Each block is locked once: never contended.
            if let Ok(mut b) = blocks[i].lock() {
                let (pb, gb, sb) = &mut *b;
                f(pb, gb, sb);
            }
        }
    });
}

/// One parameter's update, applied in place over its storage (no temporaries).
enum FusedStep<'a> {
    Sgd {
        lr: f32,
        wd: f32,
        momentum: f32,
        nesterov: bool,
        first: bool,
        buf: RefCell<Option<&'a mut [f32]>>,
        scale: f32,
    },
    AdamW {
        lr: f32,
        wd: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        bc1: f32,
        bc2_sqrt: f32,
        m: RefCell<&'a mut [f32]>,
        v: RefCell<&'a mut [f32]>,
        scale: f32,
    },
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "whittle-fused-optimizer-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("fused optimizer step needs f32 parameters and gradients")
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused optimizer step needs contiguous tensors")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        if p.len() != g.len() {
            candle_core::bail!("parameter and gradient sizes differ")
        }
        match self {
            FusedStep::Sgd {
                lr,
                wd,
                momentum,
                nesterov,
                first,
                buf,
                scale,
            } => {
                let mut buf = buf.borrow_mut();
                let k = SgdConsts {
                    lr: *lr,
                    wd: *wd,
                    momentum: *momentum,
                    nesterov: *nesterov,
                    first: *first,
                    scale: *scale,
                };
                match buf.as_deref_mut() {
                    None => par_zip(p, g, &mut [], |p, g, _| sgd_plain(p, g, k)),
                    Some(b) => par_zip(p, g, &mut [b], |p, g, s| sgd_momentum(p, g, s, k)),
                }
            }
            FusedStep::AdamW {
                lr,
                wd,
                beta1,
                beta2,
                eps,
                bc1,
                bc2_sqrt,
                m,
                v,
                scale,
            } => {
                let (mut m, mut v) = (m.borrow_mut(), v.borrow_mut());
                let k = AdamWConsts {
                    step_size: lr / bc1,
                    decay: 1.0 - lr * wd,
                    beta1: *beta1,
                    beta2: *beta2,
                    eps: *eps,
                    bc2_sqrt: *bc2_sqrt,
                    scale: *scale,
                };
                par_zip(p, g, &mut [&mut m, &mut v], |p, g, s| {
                    if let [m, v] = s {
                        adamw(p, g, m, v, k)
                    }
                });
            }
        }
        Ok(())
    }
}

/// SGD's constants for one parameter, by value (see [`adamw`] for why).
#[derive(Clone, Copy)]
struct SgdConsts {
    lr: f32,
    wd: f32,
    momentum: f32,
    nesterov: bool,
    first: bool,
    scale: f32,
}

/// Plain SGD with L2 weight decay over one block.
fn sgd_plain(p: &mut [f32], g: &[f32], k: SgdConsts) {
    let n = p.len().min(g.len());
    let (p, g) = (&mut p[..n], &g[..n]);
    for i in 0..n {
        let d = g[i] * k.scale + k.wd * p[i];
        p[i] -= k.lr * d;
    }
}

/// SGD with (Nesterov) momentum over one block; `s[0]` is the momentum buffer.
fn sgd_momentum(p: &mut [f32], g: &[f32], s: &mut [&mut [f32]], k: SgdConsts) {
    let Some(b) = s.first_mut() else { return };
    let n = p.len().min(g.len()).min(b.len());
    let (p, g, b) = (&mut p[..n], &g[..n], &mut b[..n]);
    // The branches are hoisted out of the loop so each loop is straight-line code.
    match (k.first, k.nesterov) {
        (true, nesterov) => {
            for i in 0..n {
                // torch initialises the buffer with the first gradient.
                let d = g[i] * k.scale + k.wd * p[i];
                b[i] = d;
                p[i] -= k.lr * if nesterov { d + k.momentum * d } else { d };
            }
        }
        (false, false) => {
            for i in 0..n {
                let d = g[i] * k.scale + k.wd * p[i];
                b[i] = k.momentum * b[i] + d;
                p[i] -= k.lr * b[i];
            }
        }
        (false, true) => {
            for i in 0..n {
                let d = g[i] * k.scale + k.wd * p[i];
                b[i] = k.momentum * b[i] + d;
                p[i] -= k.lr * (d + k.momentum * b[i]);
            }
        }
    }
}

/// AdamW's constants for one parameter, by value: the update loops read them from
/// registers. (Captured by reference, they were re-read through two pointers per element,
/// and the loop ran scalar: 55% of a LeNet-300-100 training step.)
#[derive(Clone, Copy)]
struct AdamWConsts {
    step_size: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    bc2_sqrt: f32,
    scale: f32,
}

/// One AdamW update (torch's formula, decoupled decay) over one block, written so the
/// compiler vectorises it: equal-length slices, indices, no captured references.
fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamWConsts) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    let (one_b1, one_b2) = (1.0 - k.beta1, 1.0 - k.beta2);
    for i in 0..n {
        let gi = g[i] * k.scale;
        let mi = k.beta1 * m[i] + one_b1 * gi;
        let vi = k.beta2 * v[i] + one_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() / k.bc2_sqrt + k.eps;
        p[i] = p[i] * k.decay - k.step_size * mi / denom;
    }
}
