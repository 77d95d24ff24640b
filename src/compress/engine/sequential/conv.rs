//! Training kernels for the layers whose candle backward pass is slow or wrong: 2-D
//! convolution (im2col + one matrix product), max pooling and ReLU (the fully connected
//! layer is [`super::linear`]'s).
//!
//! candle's own `conv2d` has a fast forward pass, but its backward computes the kernel
//! gradient as one huge convolution and the input gradient as a transposed convolution,
//! which made a LeNet-5 training step ~50× slower than PyTorch's. Here the convolution is
//!
//! ```text
//! cols = im2col(x)                 [c·kh·kw (+1 row of ones), batch·out_h·out_w]
//! y    = [W | b] · cols            [out_c, batch·out_h·out_w]  → NCHW
//! ```
//!
//! with a backward pass of products only (`d[W | b] = dY · colsᵀ`, and `dcols = [W | b]ᵀ ·
//! dY` when `x` needs a gradient); the bias rides along as a row of ones, so it needs no
//! broadcast add and no strided reduction. The forward product is one gemm call per
//! sample, written straight into the sample's NCHW planes; the kernel gradient of a
//! layer with few output channels is `conv_kernels`' (gemm would pack the whole
//! im2col matrix for it). The only other work is the im2col copy (`Im2Col`) and its
//! adjoint (the col2im scatter-add, `Im2Col`'s backward). The im2col matrix is kept
//! transposed (one row per kernel tap) so both copies move runs of whole output rows;
//! all of them are split across candle's `RAYON_NUM_THREADS` worker pool.
//!
//! [`MaxPool2d`] and [`Relu`] are single candle ops whose backward passes do
//! the minimum (see their docs for what candle's own ops do, and where its gradients
//! differ from PyTorch's). Every backward pass here skips the gradients of operands
//! that need none: candle's backward graph allocates a zeroed accumulator and runs an
//! add for every node and every operand, so fewer, fused nodes are most of the win.
//!
//! Only `f32` tensors on the CPU, groups 1 and dilation 1 are supported (all the engine
//! builds); anything else is an error, never a panic.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::conv_kernels;
use crate::compress::parallel::output_buffer;
pub(crate) use crate::compress::parallel::{par_units, par_units_of_work};

/// The geometry of one convolution: input `[n, c, h, w]`, kernel `[_, c, kh, kw]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
    /// Whether the im2col matrix ends with a row of ones (the bias tap).
    ones: bool,
}

impl Geometry {
    /// Output positions per sample.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }

    /// Kernel taps (`c · kh · kw`): the rows of the im2col matrix that come from `x`.
    fn taps(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// All rows of the im2col matrix, the ones row included.
    fn rows(&self) -> usize {
        self.taps() + usize::from(self.ones)
    }

    /// Columns of the im2col matrix: every output position of every sample.
    fn cols(&self) -> usize {
        self.n * self.positions()
    }

    /// For kernel column `kx`: the output columns `[lo, hi)` whose input column lies
    /// inside the image (the others read zero padding).
    fn ox_range(&self, kx: usize) -> (usize, usize) {
        // Output column `ox` reads input column `ox·stride + kx − pw`.
        let lo = self
            .pw
            .saturating_sub(kx)
            .div_ceil(self.stride)
            .min(self.ow);
        let hi = (self.w + self.pw)
            .saturating_sub(kx)
            .div_ceil(self.stride)
            .min(self.ow)
            .max(lo);
        (lo, hi)
    }

    /// The input row read by output row `oy` at kernel row `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.ph)
            .filter(|&iy| iy < self.h)
    }
}

/// The im2col rearrangement as a candle op whose backward pass is col2im.
///
/// Input `[n, c, h, w]` (contiguous f32); output `[c·kh·kw (+1), n·oh·ow]`: row
/// `(ch·kh + ky)·kw + kx` holds, for every output position `(i, y, x)` in row-major
/// order, the (zero-padded) input value under kernel tap `(ch, ky, kx)`; an optional
/// last row of ones carries the bias.
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    geometry: Geometry,
}

/// The adjoint of [`Im2Col`]: scatter-adds the tap rows of an im2col-shaped matrix back
/// into `[n, c, h, w]` (the ones row has no source and is ignored). Used only as
/// [`Im2Col`]'s backward (no second-order gradients).
#[derive(Debug, Clone, Copy)]
struct Col2Im {
    geometry: Geometry,
}

/// The sums of the columns of `t` `[m, n]`: `[n]`, each column's rows added in order from
/// zero — bit for bit candle's `sum(0)`, which walks the elements on one thread with an
/// index division each. Here blocks of columns go to the worker pool, and each adds its
/// slice of every row (contiguous, vectorised).
pub(crate) fn column_sums(t: &Tensor) -> candle_core::Result<Tensor> {
    let (m, n) = t.dims2()?;
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(all)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        drop(storage);
        return t.sum(0);
    };
    let x = &all[a..b];
    let mut out = vec![0f32; n];
    // Blocks of columns: each adds its slice of every row, rows in order.
    par_units_of_work(&mut out, 1, m * n, |first, cols| {
        for row in x.chunks_exact(n) {
            for (s, v) in cols.iter_mut().zip(&row[first..]) {
                *s += v;
            }
        }
    });
    drop(storage);
    Tensor::from_vec(out, n, t.device())
}

/// `f(i, x[i])` for every element, in parallel when large ([`par_units`]).
pub(crate) fn par_map(x: &[f32], f: impl Fn(usize, f32) -> f32 + Sync) -> Vec<f32> {
    // Every element is written below.
    let mut out = output_buffer(x.len());
    par_units(&mut out, 1, |first, out| {
        for (k, (o, &v)) in out.iter_mut().zip(&x[first..]).enumerate() {
            *o = f(first + k, v);
        }
    });
    out
}

/// `f(x[i], y[i])` for every pair of elements (`x` and `y` as long), in parallel when large.
pub(crate) fn par_map2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    // Every element is written below.
    let mut out = output_buffer(x.len());
    par_units(&mut out, 1, |first, out| {
        for ((o, &a), &b) in out.iter_mut().zip(&x[first..]).zip(&y[first..]) {
            *o = f(a, b);
        }
    });
    out
}

impl Im2Col {
    /// Fills whole rows of the im2col matrix, starting at row `first`.
    fn fill(g: &Geometry, x: &[f32], first: usize, rows: &mut [f32]) {
        let (plane, positions) = (g.h * g.w, g.positions());
        for (r, row) in rows.chunks_exact_mut(g.cols()).enumerate() {
            let tap = first + r;
            if tap >= g.taps() {
                row.fill(1.0);
                continue;
            }
            let (ch, ky, kx) = (tap / (g.kh * g.kw), tap / g.kw % g.kh, tap % g.kw);
            let (lo, hi) = g.ox_range(kx);
            for (i, out) in row.chunks_exact_mut(positions).enumerate() {
                let image = &x[(i * g.c + ch) * plane..][..plane];
                for (oy, out) in out.chunks_exact_mut(g.ow).enumerate() {
                    let Some(iy) = g.input_row(oy, ky) else {
                        out.fill(0.0);
                        continue;
                    };
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if lo == hi {
                        continue;
                    }
                    // Input column of output column `lo`.
                    let start = iy * g.w + lo * g.stride + kx - g.pw;
                    if g.stride == 1 {
                        out[lo..hi].copy_from_slice(&image[start..start + (hi - lo)]);
                    } else {
                        for (o, v) in out[lo..hi]
                            .iter_mut()
                            .zip(image[start..].iter().step_by(g.stride))
                        {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

impl Col2Im {
    /// Accumulates into whole samples of `dx` (zeroed), starting at sample `first`.
    fn fill(g: &Geometry, cols: &[f32], first: usize, dx: &mut [f32]) {
        let (plane, positions) = (g.h * g.w, g.positions());
        for (s, sample) in dx.chunks_exact_mut(g.c * plane).enumerate() {
            let i = first + s;
            for tap in 0..g.taps() {
                let (ch, ky, kx) = (tap / (g.kh * g.kw), tap / g.kw % g.kh, tap % g.kw);
                let (lo, hi) = g.ox_range(kx);
                if lo == hi {
                    continue;
                }
                let image = &mut sample[ch * plane..][..plane];
                let src = &cols[tap * g.cols() + i * positions..][..positions];
                for (oy, src) in src.chunks_exact(g.ow).enumerate() {
                    let Some(iy) = g.input_row(oy, ky) else {
                        continue;
                    };
                    let start = iy * g.w + lo * g.stride + kx - g.pw;
                    if g.stride == 1 {
                        // Contiguous runs: a loop the compiler vectorises.
                        let run = &mut image[start..start + (hi - lo)];
                        for (d, v) in run.iter_mut().zip(&src[lo..hi]) {
                            *d += v;
                        }
                        continue;
                    }
                    for (d, v) in image[start..]
                        .iter_mut()
                        .step_by(g.stride)
                        .zip(&src[lo..hi])
                    {
                        *d += v;
                    }
                }
            }
        }
    }
}

/// The f32 values of a contiguous CPU tensor argument.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!(
            "{op}: only f32 tensors are supported, got {:?}",
            storage.dtype()
        )
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the argument must be contiguous"),
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        if layout.shape().dims() != [g.n, g.c, g.h, g.w] {
            bail!(
                "im2col: expected input {:?}, got {:?}",
                [g.n, g.c, g.h, g.w],
                layout.shape()
            )
        }
        let x = contiguous_f32("im2col", storage, layout)?;
        // `fill` writes every value, the padding's zeros included.
        let mut cols = output_buffer(g.rows() * g.cols());
        par_units(&mut cols, g.cols(), |first, rows| {
            Im2Col::fill(&g, x, first, rows)
        });
        Ok((CpuStorage::F32(cols), Shape::from((g.rows(), g.cols()))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(grad.apply_op1_no_bwd(&Col2Im {
            geometry: self.geometry,
        })?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        if layout.shape().dims() != [g.rows(), g.cols()] {
            bail!(
                "col2im: expected columns {:?}, got {:?}",
                [g.rows(), g.cols()],
                layout.shape()
            )
        }
        let cols = contiguous_f32("col2im", storage, layout)?;
        let mut dx = vec![0f32; g.n * g.c * g.h * g.w];
        par_units(&mut dx, g.c * g.h * g.w, |first, dx| {
            Col2Im::fill(&g, cols, first, dx)
        });
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// Cross-correlation of `x` `[n, c, h, w]` with `kernel` `[out_c, c, kh, kw]` plus an
/// optional `bias` `[out_c]` (groups 1, dilation 1), `stride` on both axes and `padding`
/// = (rows, columns) of zeros on each side: the same result as candle's `conv2d` followed
/// by a bias add, with a gemm-based backward pass for `x`, `kernel` and `bias`.
/// Returns `[n, out_c, oh, ow]`.
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: (usize, usize),
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (out_c, kc, kh, kw) = kernel.dims4()?;
    if kc != c {
        bail!("conv2d: input has {c} channels but the kernel expects {kc}")
    }
    if stride == 0 || kh == 0 || kw == 0 {
        bail!("conv2d: stride and kernel size must be positive")
    }
    let (ph, pw) = padding;
    if h + 2 * ph < kh || w + 2 * pw < kw {
        bail!(
            "conv2d: kernel {kh}x{kw} is larger than the padded input {}x{}",
            h + 2 * ph,
            w + 2 * pw
        )
    }
    let geometry = Geometry {
        n,
        c,
        h,
        w,
        kh,
        kw,
        stride,
        ph,
        pw,
        oh: (h + 2 * ph - kh) / stride + 1,
        ow: (w + 2 * pw - kw) / stride + 1,
        ones: bias.is_some(),
    };
    let cols = x.contiguous()?.apply_op1(Im2Col { geometry })?;
    let mut weight = kernel.reshape((out_c, geometry.taps()))?;
    if let Some(b) = bias {
        weight = Tensor::cat(&[&weight, &b.reshape((out_c, 1))?], 1)?;
    }
    weight.apply_op2(&cols, ConvGemm { geometry, out_c })
}

/// `[W | b] · cols` laid out as NCHW: the product of the (bias-augmented) kernel matrix
/// and the im2col matrix, each sample's columns multiplied into its own output planes,
/// as one candle op. Doing the layout change inside the op keeps three full-size view
/// nodes (each a zeroed accumulator and an add in candle's backward) out of the graph;
/// its backward computes only the gradients needed.
#[derive(Debug, Clone, Copy)]
struct ConvGemm {
    geometry: Geometry,
    out_c: usize,
}

impl candle_core::CustomOp2 for ConvGemm {
    fn name(&self) -> &'static str {
        "conv_gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let (o, l) = (self.out_c, g.positions());
        if l1.shape().dims() != [o, g.rows()] || l2.shape().dims() != [g.rows(), g.cols()] {
            bail!(
                "conv gemm: cannot multiply {:?} by {:?}",
                l1.shape(),
                l2.shape()
            )
        }
        let shape = Shape::from((g.n, o, g.oh, g.ow));
        if o * g.cols() == 0 {
            return Ok((CpuStorage::F32(Vec::new()), shape));
        }
        let w = contiguous_f32("conv gemm", s1, l1)?;
        let cols = contiguous_f32("conv gemm", s2, l2)?;
        let (r, total) = (g.rows(), g.cols());
        // One gemm per sample, `W · cols[:, s·l..(s+1)·l]` straight into the sample's NCHW
        // planes (gemm writes every value: `read_dst` false), samples split over candle's
        // worker pool. One product of the whole batch ran on rayon's threads while the
        // pool's worker spun, packed the whole im2col matrix, and needed a copy into NCHW.
        let mut out = output_buffer(g.n * o * l);
        par_units_of_work(&mut out, o * l, g.n * o * l * r, |first, samples| {
            for (k, y) in samples.chunks_exact_mut(o * l).enumerate() {
                let s = first + k;
                // SAFETY: `y` holds the sample's o·l values, written at (i·l + q); `w` holds
                // o·r values read at (i·r + t); `cols` holds r·n·l values read at
                // (t·n·l + s·l + q), for i < o, t < r, q < l and s < n (shapes checked above).
                unsafe {
                    gemm::gemm(
                        o,
                        l,
                        r,
                        y.as_mut_ptr(),
                        1,
                        l as isize,
                        false,
                        w.as_ptr(),
                        1,
                        r as isize,
                        cols.as_ptr().add(s * l),
                        1,
                        total as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        weight: &Tensor,
        cols: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry;
        let grad = grad.contiguous()?;
        let wide = self.out_c > conv_kernels::MAX_OUT_CHANNELS;
        // [n, o, l] → [o, n·l], matching gemm's product (the gradient is never recorded).
        let by_channel = if cols.track_op() || (wide && weight.track_op()) {
            Some(
                grad.reshape((g.n, self.out_c, g.positions()))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((self.out_c, g.cols()))?,
            )
        } else {
            None
        };
        let dweight = match (&by_channel, weight.track_op()) {
            (_, false) => None,
            (Some(grad), true) if wide => Some(grad.matmul(&cols.detach().t()?)?),
            _ => Some(grad.apply_op2_no_bwd(
                &cols.detach(),
                &KernelGrad {
                    geometry: g,
                    out_c: self.out_c,
                },
            )?),
        };
        let dcols = match &by_channel {
            Some(grad) if cols.track_op() => Some(weight.detach().t()?.matmul(grad)?),
            _ => None,
        };
        Ok((dweight, dcols))
    }
}

/// The kernel gradient of [`ConvGemm`], `d[W | b] = dY · colsᵀ`, read from the NCHW
/// output gradient and the im2col matrix in place: `(dY, cols) → [out_c, rows]`.
#[derive(Debug, Clone, Copy)]
struct KernelGrad {
    geometry: Geometry,
    out_c: usize,
}

impl candle_core::CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "conv_kernel_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let (o, l) = (self.out_c, g.positions());
        if l1.shape().elem_count() != g.n * o * l || l2.shape().dims() != [g.rows(), g.cols()] {
            bail!(
                "conv kernel gradient: gradient {:?} and columns {:?} do not match",
                l1.shape(),
                l2.shape()
            )
        }
        let dy = contiguous_f32("conv kernel gradient", s1, l1)?;
        let cols = contiguous_f32("conv kernel gradient", s2, l2)?;
        let dw = conv_kernels::weight_gradient(dy, cols, g.n, o, l, g.rows());
        Ok((CpuStorage::F32(dw), Shape::from((o, g.rows()))))
    }
}

/// Max pooling with the window equal to the stride (`kernel` = (rows, columns)) over an
/// `[n, c, h, w]` f32 tensor whose `h` and `w` are multiples of the window, as a candle op.
///
/// Its backward pass routes each window's gradient to the first maximal element only, as
/// PyTorch does, in one pass. (candle 0.11's own `max_pool2d` backward scales every
/// gradient by `ties / (kh·kw)`: a unique maximum of a 2×2 window gets only a quarter of
/// its gradient, and it builds four temporaries the size of the input to do so.)
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    /// Window rows and columns (also the stride).
    pub kernel: (usize, usize),
}

/// The backward pass of [`MaxPool2d`]: `(input, output gradient) → input gradient`.
#[derive(Debug, Clone, Copy)]
struct MaxPool2dGrad {
    kernel: (usize, usize),
}

impl MaxPool2d {
    /// The pooled shape of an input layout, refusing anything the op cannot pool:
    /// `(planes, h, w, outputs per plane)`.
    fn pooled(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (kh, kw) = self.kernel;
        let &[n, c, h, w] = layout.shape().dims() else {
            bail!(
                "max_pool2d: expected an NCHW input, got {:?}",
                layout.shape()
            )
        };
        if kh == 0 || kw == 0 || h % kh != 0 || w % kw != 0 {
            bail!("max_pool2d: a {kh}x{kw} window does not tile a {h}x{w} input")
        }
        Ok((n * c, h, w, (h / kh) * (w / kw)))
    }

    /// Applies the op (with its backward pass) to `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }

    /// The index inside `plane` (`w` columns) of the first maximum of window `(oy, ox)`.
    fn argmax(&self, plane: &[f32], w: usize, oy: usize, ox: usize) -> usize {
        let (kh, kw) = self.kernel;
        let mut best = (oy * kh) * w + ox * kw;
        for ky in 0..kh {
            let row = (oy * kh + ky) * w + ox * kw;
            for i in row..row + kw {
                if replaces(plane[best], plane[i]) {
                    best = i;
                }
            }
        }
        best
    }
}

/// The running maximum of a window after value `v`: `v` replaces `best` only where it is
/// larger, or a NaN where `best` is not ([`MaxPool2d::argmax`]'s first maximum, as values).
#[inline(always)]
fn later_wins(best: f32, v: f32) -> f32 {
    if replaces(best, v) {
        v
    } else {
        best
    }
}

/// Whether `v` replaces the running maximum `best`: larger, or a NaN over a number (as in
/// PyTorch).
#[inline(always)]
fn replaces(best: f32, v: f32) -> bool {
    v > best || (v.is_nan() && !best.is_nan())
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (planes, h, w, per) = self.pooled(layout)?;
        let x = contiguous_f32("max_pool2d", storage, layout)?;
        let ow = w / self.kernel.1;
        // One value per window, every window.
        let mut out = output_buffer(planes * per);
        let two = self.kernel == (2, 2);
        par_units(&mut out, per, |first, out| {
            for (p, out) in out.chunks_exact_mut(per).enumerate() {
                let plane = &x[(first + p) * h * w..][..h * w];
                for (oy, out) in out.chunks_exact_mut(ow).enumerate() {
                    if two {
                        let rows = &plane[2 * oy * w..][..2 * w];
                        let (r0, r1) = rows.split_at(w);
                        for ((o, a), b) in out
                            .iter_mut()
                            .zip(r0.chunks_exact(2))
                            .zip(r1.chunks_exact(2))
                        {
                            *o = later_wins(later_wins(later_wins(a[0], a[1]), b[0]), b[1]);
                        }
                        continue;
                    }
                    for (ox, o) in out.iter_mut().enumerate() {
                        *o = plane[self.argmax(plane, w, oy, ox)];
                    }
                }
            }
        });
        let dims = layout.shape().dims();
        let shape = (dims[0], dims[1], h / self.kernel.0, ow);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &grad,
            &MaxPool2dGrad {
                kernel: self.kernel,
            },
        )?))
    }
}

impl candle_core::CustomOp2 for MaxPool2dGrad {
    fn name(&self) -> &'static str {
        "max_pool2d_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let pool = MaxPool2d {
            kernel: self.kernel,
        };
        let (planes, h, w, per) = pool.pooled(l1)?;
        if l2.shape().elem_count() != planes * per {
            bail!(
                "max_pool2d backward: gradient {:?} does not match input {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let x = contiguous_f32("max_pool2d backward", s1, l1)?;
        let grad = contiguous_f32("max_pool2d backward", s2, l2)?;
        let ow = w / self.kernel.1;
        if pool.kernel == (2, 2) {
            // The windows tile the input, so every input value is written once: its
            // window's gradient where it is the window's maximum, zero elsewhere.
            let mut dx = output_buffer(planes * h * w);
            par_units(&mut dx, h * w, |first, dx| {
                for (p, dx) in dx.chunks_exact_mut(h * w).enumerate() {
                    let plane = &x[(first + p) * h * w..][..h * w];
                    let g = &grad[(first + p) * per..][..per];
                    // Row pairs of the input and of its gradient, a window per output.
                    let rows = plane.chunks_exact(2 * w).zip(dx.chunks_exact_mut(2 * w));
                    for (g, (x, d)) in g.chunks_exact(ow).zip(rows) {
                        let (x0, x1) = x.split_at(w);
                        let (d0, d1) = d.split_at_mut(w);
                        let windows = x0.chunks_exact(2).zip(x1.chunks_exact(2));
                        let targets = d0.chunks_exact_mut(2).zip(d1.chunks_exact_mut(2));
                        for ((&g, (a, b)), (da, db)) in g.iter().zip(windows).zip(targets) {
                            let values = [a[0], a[1], b[0], b[1]];
                            let (mut best, mut k) = (values[0], 0);
                            for (j, &v) in values.iter().enumerate().skip(1) {
                                let take = replaces(best, v);
                                k = if take { j } else { k };
                                best = if take { v } else { best };
                            }
                            da[0] = if k == 0 { g } else { 0.0 };
                            da[1] = if k == 1 { g } else { 0.0 };
                            db[0] = if k == 2 { g } else { 0.0 };
                            db[1] = if k == 3 { g } else { 0.0 };
                        }
                    }
                }
            });
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        let mut dx = vec![0f32; planes * h * w];
        par_units(&mut dx, h * w, |first, dx| {
            for (p, dx) in dx.chunks_exact_mut(h * w).enumerate() {
                let plane = &x[(first + p) * h * w..][..h * w];
                let g = &grad[(first + p) * per..][..per];
                for (oy, g) in g.chunks_exact(ow).enumerate() {
                    for (ox, g) in g.iter().enumerate() {
                        dx[pool.argmax(plane, w, oy, ox)] = *g;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// ReLU as a candle op whose backward is one fused pass, `grad · [y > 0]` (PyTorch's
/// gradient). candle's own backward builds a zeros tensor, a comparison, a dtype cast and
/// a product, each a full-size temporary.
#[derive(Debug, Clone, Copy)]
pub struct Relu;

/// The backward pass of [`Relu`]: `(output, output gradient) → input gradient`.
#[derive(Debug, Clone, Copy)]
struct ReluGrad;

impl Relu {
    /// Applies the op (with its backward pass) to `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(*self)
    }
}

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("relu", storage, layout)?;
        let out = par_map(x, |_, v| v.max(0.0));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad_res.contiguous()?, &ReluGrad)?,
        ))
    }
}

impl candle_core::CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "relu backward: gradient {:?} does not match {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let y = contiguous_f32("relu backward", s1, l1)?;
        let grad = contiguous_f32("relu backward", s2, l2)?;
        let dx = par_map2(y, grad, |y, g| if y > 0.0 { g } else { 0.0 });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub(crate) fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0.0, f32::max)
    }

    /// Direct loops: the forward value and the input / kernel gradients of
    /// `sum(conv2d(x, k) * r)`, accumulated in f64.
    fn reference(
        x: &Tensor,
        k: &Tensor,
        r: &Tensor,
        stride: usize,
        pad: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, c, h, w) = x.dims4().unwrap();
        let (o, _, kh, kw) = k.dims4().unwrap();
        let (_, _, oh, ow) = r.dims4().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kv = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rv = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (mut y, mut dx, mut dk) = (
            vec![0f64; rv.len()],
            vec![0f64; xv.len()],
            vec![0f64; kv.len()],
        );
        for (b, oc, oy, ox) in grid4(n, o, oh, ow) {
            let yi = ((b * o + oc) * oh + oy) * ow + ox;
            for (ch, ky, kx) in (0..c)
                .flat_map(|ch| (0..kh).flat_map(move |ky| (0..kw).map(move |kx| (ch, ky, kx))))
            {
                let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                    continue;
                }
                let xi = ((b * c + ch) * h + iy - pad) * w + ix - pad;
                let ki = ((oc * c + ch) * kh + ky) * kw + kx;
                y[yi] += xv[xi] as f64 * kv[ki] as f64;
                dx[xi] += rv[yi] as f64 * kv[ki] as f64;
                dk[ki] += rv[yi] as f64 * xv[xi] as f64;
            }
        }
        (y, dx, dk)
    }

    fn grid4(
        a: usize,
        b: usize,
        c: usize,
        d: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..a).flat_map(move |i| {
            (0..b).flat_map(move |j| (0..c).flat_map(move |k| (0..d).map(move |l| (i, j, k, l))))
        })
    }

    fn max_rel_diff_ref(a: &Tensor, b: &[f64]) -> f32 {
        let b = Tensor::from_vec(
            b.iter().map(|v| *v as f32).collect::<Vec<_>>(),
            a.dims(),
            &Device::Cpu,
        )
        .unwrap();
        max_rel_diff(a, &b)
    }

    /// Forward values and input / kernel gradients equal a direct-loop reference, and
    /// candle's `conv2d` forward; its gradients too wherever candle's own conv2d backward
    /// works (it fails with a shape error on some non-square inputs).
    #[test]
    fn matches_candle_conv2d_forward_and_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut cases, mut candle_grads) = (0, 0);
        for stride in [1usize, 2] {
            for pad in [0usize, 1, 2] {
                for (n, c, o, h, w, k) in [
                    (2, 1, 3, 9, 9, 3),
                    (3, 4, 5, 8, 7, 3),
                    (2, 3, 6, 10, 10, 5),
                    (1, 6, 2, 6, 6, 1),
                    (100, 2, 3, 16, 16, 3),
                    // Wider than conv_kernels::MAX_OUT_CHANNELS: gemm's path.
                    (2, 3, 40, 7, 7, 3),
                ] {
                    let x = Var::from_tensor(&random(&[n, c, h, w], &mut rng)).unwrap();
                    let k = Var::from_tensor(&random(&[o, c, k, k], &mut rng)).unwrap();
                    let ours =
                        conv2d(x.as_tensor(), k.as_tensor(), None, stride, (pad, pad)).unwrap();
                    let theirs = x
                        .as_tensor()
                        .conv2d(k.as_tensor(), pad, stride, 1, 1)
                        .unwrap();
                    let what = format!("stride {stride} pad {pad} n{n} c{c} o{o} {h}x{w}");
                    assert!(max_rel_diff(&ours, &theirs) < 1e-5, "forward {what}");
                    let r = random(ours.dims(), &mut rng);
                    let (y, dx, dk) = reference(x.as_tensor(), k.as_tensor(), &r, stride, pad);
                    assert!(max_rel_diff_ref(&ours, &y) < 1e-5, "forward {what}");
                    let g_ours = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    for (name, v, want) in [("input", &x, &dx), ("kernel", &k, &dk)] {
                        let got = g_ours.get(v.as_tensor()).unwrap();
                        let d = max_rel_diff_ref(got, want);
                        assert!(d < 1e-4, "{name} gradient {what}: {d}");
                    }
                    if let Ok(g_theirs) = (&theirs * &r).unwrap().sum_all().unwrap().backward() {
                        for (name, v) in [("input", &x), ("kernel", &k)] {
                            let a = g_ours.get(v.as_tensor()).unwrap();
                            let b = g_theirs.get(v.as_tensor()).unwrap();
                            let d = max_rel_diff(a, b);
                            assert!(d < 1e-4, "{name} gradient vs candle {what}: {d}");
                        }
                        candle_grads += 1;
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 36);
        assert!(candle_grads >= 24, "{candle_grads}");
    }

    /// The bias row of ones gives candle's `conv2d + bias` and the bias gradient
    /// `sum(r)` over batch and positions.
    #[test]
    fn folded_bias_matches_broadcast_add() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (stride, pad) in [(1, 1), (2, 0)] {
            let x = Var::from_tensor(&random(&[3, 2, 9, 9], &mut rng)).unwrap();
            let k = Var::from_tensor(&random(&[5, 2, 3, 3], &mut rng)).unwrap();
            let b = Var::from_tensor(&random(&[5], &mut rng)).unwrap();
            let (xt, kt, bt) = (x.as_tensor(), k.as_tensor(), b.as_tensor());
            let ours = conv2d(xt, kt, Some(bt), stride, (pad, pad)).unwrap();
            let theirs = xt
                .conv2d(kt, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bt.reshape((1, 5, 1, 1)).unwrap())
                .unwrap();
            assert!(max_rel_diff(&ours, &theirs) < 1e-5);
            let r = random(ours.dims(), &mut rng);
            let g = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (_, dx, dk) = reference(xt, kt, &r, stride, pad);
            assert!(max_rel_diff_ref(g.get(xt).unwrap(), &dx) < 1e-4);
            assert!(max_rel_diff_ref(g.get(kt).unwrap(), &dk) < 1e-4);
            let db = r.sum((0, 2, 3)).unwrap();
            assert!(max_rel_diff(g.get(bt).unwrap(), &db) < 1e-4);
        }
    }

    /// Max pooling: forward equals candle's; backward gives each window's whole
    /// gradient to its first maximum (PyTorch semantics).
    #[test]
    fn max_pool_matches_candle_forward_and_pytorch_backward() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (kernel, shape) in [((2, 2), [3, 4, 8, 6]), ((3, 1), [2, 2, 9, 4])] {
            let x = Var::from_tensor(&random(&shape, &mut rng)).unwrap();
            let pool = MaxPool2d { kernel };
            let ours = pool.forward(x.as_tensor()).unwrap();
            let theirs = x
                .as_tensor()
                .max_pool2d_with_stride(kernel, kernel)
                .unwrap();
            assert_eq!(max_rel_diff(&ours, &theirs), 0.0);
            let r = random(ours.dims(), &mut rng);
            let g = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            // Every window's gradient sits on its maximum, all else is zero.
            let xv = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let dv = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (h, w) = (shape[2], shape[3]);
            let (oh, ow) = (h / kernel.0, w / kernel.1);
            let rv = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (o, want) in rv.iter().enumerate() {
                let (p, oy, ox) = (o / (oh * ow), o / ow % oh, o % ow);
                let idx: Vec<usize> = (0..kernel.0)
                    .flat_map(|ky| {
                        (0..kernel.1).map(move |kx| {
                            p * h * w + (oy * kernel.0 + ky) * w + ox * kernel.1 + kx
                        })
                    })
                    .collect();
                let top = idx
                    .iter()
                    .copied()
                    .fold(idx[0], |b, i| if xv[i] > xv[b] { i } else { b });
                for i in idx {
                    assert_eq!(dv[i], if i == top { *want } else { 0.0 });
                }
            }
        }
        // Ties go to the first maximum; a window that does not tile is an error.
        let x = Var::new(&[[[[1f32, 1.], [0., 1.]]]], &Device::Cpu).unwrap();
        let pool = MaxPool2d { kernel: (2, 2) };
        let g = pool
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(dx, vec![1.0, 0.0, 0.0, 0.0]);
        // A NaN wins over numbers, the first NaN over later ones (PyTorch), on the 2×2 path
        // and on the general one (the same window read as 1×4).
        let nan = f32::NAN;
        for (kernel, shape) in [((2, 2), (1, 1, 2, 2)), ((1, 4), (1, 1, 1, 4))] {
            let x = Var::from_vec(vec![1f32, nan, 5., nan], shape, &Device::Cpu).unwrap();
            let pool = MaxPool2d { kernel };
            let y = pool.forward(x.as_tensor()).unwrap();
            assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
            let g = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
            assert_eq!(dx.to_vec1::<f32>().unwrap(), vec![0.0, 3.0, 0.0, 0.0]);
        }
        let odd = Tensor::zeros((1, 1, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(pool.forward(&odd).is_err());
    }

    #[test]
    fn relu_forward_and_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let x = Var::from_tensor(&random(&[3, 70000], &mut rng)).unwrap();
        let ours = Relu.forward(x.as_tensor()).unwrap();
        assert_eq!(max_rel_diff(&ours, &x.as_tensor().relu().unwrap()), 0.0);
        let r = random(ours.dims(), &mut rng);
        let g = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let want = (r * x
            .as_tensor()
            .gt(0.0)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap())
        .unwrap();
        assert_eq!(max_rel_diff(g.get(x.as_tensor()).unwrap(), &want), 0.0);
    }

    /// Asymmetric padding equals explicit zero padding followed by an unpadded conv.
    #[test]
    fn asymmetric_padding_matches_explicit_padding() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = random(&[2, 3, 7, 9], &mut rng);
        let k = random(&[4, 3, 3, 3], &mut rng);
        let ours = conv2d(&x, &k, None, 2, (2, 1)).unwrap();
        let padded = x
            .pad_with_zeros(2, 2, 2)
            .unwrap()
            .pad_with_zeros(3, 1, 1)
            .unwrap();
        let theirs = padded.conv2d(&k, 0, 2, 1, 1).unwrap();
        assert!(max_rel_diff(&ours, &theirs) < 1e-5);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = Tensor::zeros((1, 2, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d(&x, &k, None, 1, (0, 0)).is_err());
        let k = Tensor::zeros((1, 2, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d(&x, &k, None, 1, (0, 0)).is_err());
        assert!(conv2d(&x, &k, None, 0, (1, 1)).is_err());
    }
}
