//! The fully connected layer as one training op (see [`Linear`]), used by the sequential
//! networks, bert and llama.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Shape, Tensor};

use super::conv::{column_sums, contiguous_f32};
use crate::compress::parallel::output_buffer;

/// A fully connected layer, `x · Wᵀ (+ b)` for `x` `[m, in]`, `W` `[out, in]`, `b`
/// `[out]`, as one candle op (with a bias) or two (without).
///
/// In candle ops this is a transpose, a matmul, a broadcast and an add: four backward
/// nodes, each with a zeroed gradient accumulator and an add, the weight gradient
/// passing through a strided (transposed) add. Here the backward pass writes `dW = dYᵀ·x`
/// directly, sums `db` in one reduction, and computes `dx = dY·W` only when `x` needs a
/// gradient (not for a first layer).
#[derive(Debug, Clone, Copy)]
pub struct Linear;

impl Linear {
    /// `x · Wᵀ + b` (or `x · Wᵀ` without a bias), `[m, in] → [m, out]`.
    pub fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match bias {
            Some(b) => x.apply_op3(weight, b, *self),
            None => x.apply_op2(weight, *self),
        }
    }

    /// `x · Wᵀ` on storages.
    fn product(
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            bail!(
                "linear: input {:?} does not fit weight {:?}",
                l1.shape(),
                l2.shape()
            )
        }
        let shape = Shape::from((m, n));
        if m * n == 0 || k == 0 {
            return Ok((CpuStorage::F32(vec![0f32; m * n]), shape));
        }
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            return Ok((
                s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?,
                shape,
            ));
        };
        // The gemm call candle's matmul makes (the same kernel, so the same bits), into an
        // output that is not zeroed first: with `read_dst` false gemm writes every
        // value without reading any. candle's `vec![0; m·n]` is a memset per layer, and
        // page faults where the allocator hands back fresh pages (the 100 MB logits of a
        // 512-token window of a 49k vocabulary).
        let (xs, ws) = (l1.stride(), l2.stride());
        let (x, w) = (&x[l1.start_offset()..], &w[l2.start_offset()..]);
        let last = |len: usize, rows: usize, rs: usize, cols: usize, cs: usize| {
            (rows - 1) * rs + (cols - 1) * cs < len
        };
        if !last(x.len(), m, xs[0], k, xs[1]) || !last(w.len(), n, ws[0], k, ws[1]) {
            bail!("linear: operands shorter than their layouts")
        }
        let mut y = output_buffer(m * n);
        // Columns n0..n0 + cols of `y` (row stride n) from rows n0..n0 + cols of W.
        let columns = |y: *mut f32, n0: usize, cols: usize, parallelism: gemm::Parallelism| {
            // SAFETY: `y` holds m·n values and the call writes columns n0..n0 + cols of each
            // row at stride n (the caller gives no two threads the same columns); `x` is read
            // at (i·xs[0] + l·xs[1]) and `w` (as Wᵀ, [k, n]) at (j·ws[0] + l·ws[1]) for i < m,
            // n0 ≤ j < n0 + cols ≤ n, l < k, all inside the slices (checked just above).
            unsafe {
                gemm::gemm(
                    m,
                    cols,
                    k,
                    y.add(n0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    xs[1] as isize,
                    xs[0] as isize,
                    w.as_ptr().add(n0 * ws[0]),
                    ws[0] as isize,
                    ws[1] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        };
        // Wide enough products run as one gemm per thread of candle's worker pool, each on its
        // own block of output columns (the same dot products in the same order, so the same
        // bits): gemm's own threads are rayon's, and while they ran, the pool's workers spun
        // waiting for the element-wise ops between products on the same cores.
        let pool = candle_core::utils::barrier_pool();
        let t = pool.n_workers() + 1;
        if t > 1 && n >= 64 * t && m * n * k >= 1 << 20 {
            let per = n.div_ceil(t).next_multiple_of(16);
            /// The output's address, shared by the threads that write disjoint columns of it.
            struct Out(*mut f32);
            // SAFETY: each thread writes only its own columns of the rows.
            unsafe impl Sync for Out {}
            let out = Out(y.as_mut_ptr());
            let out = &out;
            // Chunked, not one call per thread id: a block whose thread is slowed is taken by
            // the other, and a call from inside the pool runs inline instead of deadlocking.
            pool.execute_chunked(n.div_ceil(per), |blocks| {
                for block in blocks {
                    let n0 = block * per;
                    columns(out.0, n0, per.min(n - n0), gemm::Parallelism::None);
                }
            });
        } else {
            let threads = candle_core::utils::get_num_threads();
            let parallelism = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            columns(y.as_mut_ptr(), 0, n, parallelism);
        }
        Ok((CpuStorage::F32(y), shape))
    }

    /// The input and weight gradients, each only if needed.
    fn grads(
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached operands: the gradient computation itself is not recorded.
        let dx = if x.track_op() {
            Some(grad.matmul(&weight.detach())?)
        } else {
            None
        };
        let dw = if weight.track_op() {
            Some(grad.t()?.matmul(&x.detach())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Linear::product(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Linear::grads(x, weight, grad)
    }
}

impl candle_core::CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear_bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (product, shape) = Linear::product(s1, l1, s2, l2)?;
        let CpuStorage::F32(mut y) = product else {
            bail!("linear: only f32 tensors are supported")
        };
        let bias = contiguous_f32("linear", s3, l3)?;
        let n = shape.dims()[1];
        if bias.len() != n {
            bail!("linear: bias {:?} does not fit {n} outputs", l3.shape())
        }
        for row in y.chunks_exact_mut(n) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = Linear::grads(x, weight, grad)?;
        let db = if bias.track_op() {
            Some(column_sums(grad)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::sequential::conv::tests::{max_rel_diff, random};
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The fused linear layer equals candle's matmul + broadcast add, forward and
    /// backward, and computes no gradient for an input that needs none.
    #[test]
    fn linear_matches_candle_ops() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x = Var::from_tensor(&random(&[7, 5], &mut rng)).unwrap();
        let w = Var::from_tensor(&random(&[3, 5], &mut rng)).unwrap();
        let b = Var::from_tensor(&random(&[3], &mut rng)).unwrap();
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let r = random(&[7, 3], &mut rng);
        let plain = xt.matmul(&wt.t().unwrap()).unwrap();
        for bias in [None, Some(bt)] {
            let ours = Linear.forward(xt, wt, bias).unwrap();
            let theirs = match bias {
                Some(b) => plain.broadcast_add(b).unwrap(),
                None => plain.clone(),
            };
            assert!(max_rel_diff(&ours, &theirs) < 1e-6);
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [xt, wt, bt] {
                match (g1.get(v), g2.get(v)) {
                    (Some(a), Some(b)) => assert!(max_rel_diff(a, b) < 1e-5),
                    (a, b) => assert_eq!(a.is_some(), b.is_some()),
                }
            }
        }
        // A detached input gets no gradient, the weight still does.
        let y = Linear.forward(&xt.detach(), wt, Some(bt)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(wt).is_some() && g.get(bt).is_some());
        assert!(Linear
            .forward(xt, &random(&[3, 4], &mut rng), None)
            .is_err());
    }

    /// The linear layer's own gemm calls give candle's matmul bit for bit (the same kernel,
    /// an output not zeroed first, wide products split by columns over the worker pool), for
    /// contiguous and transposed operands, offsets into a larger storage, and shapes large
    /// enough to run in parallel.
    #[test]
    fn linear_product_is_candles_matmul_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (m, k, n) in [(7, 5, 3), (130, 96, 70), (512, 64, 300)] {
            let x = random(&[m, k], &mut rng);
            let w = random(&[n, k], &mut rng);
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = Linear.forward(&x, &w, None).unwrap();
            assert_eq!(max_rel_diff(&got, &want), 0.0, "{m}x{k}x{n}");
            // x read through its transpose's strides, w from an offset of a wider tensor.
            let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
            let wide = random(&[n, k + 3], &mut rng);
            let wn = wide.narrow(1, 2, k).unwrap();
            let want = xt.matmul(&wn.t().unwrap()).unwrap();
            let got = Linear.forward(&xt, &wn, None).unwrap();
            assert_eq!(max_rel_diff(&got, &want), 0.0, "{m}x{k}x{n}, strided");
        }
    }
}
