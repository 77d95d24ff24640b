//! One thread budget for every kernel: `WHITTLE_THREADS` (default: the cores available).
//!
//! Kernels that split large work (radix selection and masking, quantizers, error statistics,
//! the GGUF writer) use at most [`threads`] scoped threads, and only above [`PARALLEL_MIN`]
//! elements (spawning costs ~20 µs). candle's own worker pool (matmul, the training engine's
//! fused ops) is sized by `RAYON_NUM_THREADS`; [`configure`] sets it to the same budget when it
//! is not set, before candle first uses it, so the two never oversubscribe the cores. Work
//! never nests: a kernel's threads do not start more threads.

use std::sync::{Mutex, OnceLock};

/// Below this many elements, work stays on the calling thread.
pub const PARALLEL_MIN: usize = 1 << 18;

static THREADS: OnceLock<usize> = OnceLock::new();

/// The thread budget.
pub fn threads() -> usize {
    *THREADS.get_or_init(|| budget(std::env::var("WHITTLE_THREADS").ok().as_deref()))
}

/// Fixes the budget at `n` threads (or from `WHITTLE_THREADS` / the cores when `None`) and
/// sizes candle's worker pool to match unless `RAYON_NUM_THREADS` is set. Call it once at
/// start-up, before any kernel runs; later calls change nothing. Returns the budget.
pub fn configure(n: Option<usize>) -> usize {
    let n = *THREADS.get_or_init(|| match n {
        Some(n) if n > 0 => n,
        _ => budget(std::env::var("WHITTLE_THREADS").ok().as_deref()),
    });
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Start-up runs this before any thread reads the environment.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    n
}

/// The budget `WHITTLE_THREADS` asks for, or the cores available.
fn budget(setting: Option<&str>) -> usize {
    setting
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `f` on each item, the first on this thread and the rest on scoped threads (one per
/// item: callers pass at most [`threads`] items).
pub fn par_map<I: Send, T: Send>(items: Vec<I>, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    if items.len() <= 1 {
        return items.into_iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut it = items.into_iter();
        let first = it.next();
        let handles: Vec<_> = it.map(|item| s.spawn(move || f(item))).collect();
        let mut out: Vec<T> = first.into_iter().map(f).collect();
        for h in handles {
            out.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        out
    })
}

/// Asks the kernel to back the whole 2 MiB extents of a large, freshly allocated and not yet
/// touched buffer with transparent huge pages (`madvise(MADV_HUGEPAGE)`; honoured where
/// `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`): the first writes
/// then take one page fault per 2 MiB instead of one per 4 KiB, which is most of what
/// writing into fresh memory costs (a 256 MiB output: 128 faults instead of 65,536). A hint
/// only; nothing changes where it is refused or on other systems.
pub fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last >= first + HUGE {
            // SAFETY: [first, last) lies inside `buf`'s allocation; MADV_HUGEPAGE changes how
            // its pages are backed, never their contents.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// An `n`-value f32 buffer for a kernel that writes every value before anything reads it
/// (an op's output filled whole by [`par_units`]). It is candle's own allocation for op
/// outputs (`alloc_uninit`), without the zeroing pass of `vec![0.0; n]` — a memset, or page
/// faults on fresh pages, on every training step.
pub(crate) fn output_buffer(n: usize) -> Vec<f32> {
    use candle_core::backend::BackendDevice;
    let shape = candle_core::Shape::from(n);
    // SAFETY: candle's CPU `alloc_uninit` returns `n` f32 values of unspecified content (any
    // bit pattern is an f32); every caller overwrites each of them before reading any.
    match unsafe {
        candle_core::cpu_backend::CpuDevice.alloc_uninit(&shape, candle_core::DType::F32)
    } {
        Ok(candle_core::CpuStorage::F32(v)) if v.len() == n => v,
        _ => vec![0f32; n],
    }
}

/// Below this many values a kernel on candle's worker pool ([`par_units`]) runs on the
/// calling thread alone: waking the pool costs more than the work.
const POOL_MIN: usize = 1 << 16;

/// Runs `f(first_unit, chunk)` over chunks of whole units (`unit` values each) of
/// `output`, on candle's persistent worker pool (`RAYON_NUM_THREADS` threads, shared
/// with candle's own element-wise ops) when the work is large enough.
pub fn par_units<T: Send, F>(output: &mut [T], unit: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync,
{
    par_units_of_work(output, unit, output.len(), f)
}

/// [`par_units`] where filling `output` costs about `work` element operations (a reduction
/// into a short output), which decides whether it is worth the pool.
pub fn par_units_of_work<T: Send, F>(output: &mut [T], unit: usize, work: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync,
{
    let units = output.len().checked_div(unit).unwrap_or(0);
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    if threads == 1 || units < 2 || work < POOL_MIN {
        f(0, output);
        return;
    }
    // A few chunks per thread, so a thread slowed by the other tenant of a shared
    // machine does not hold everyone up.
    let per = units.div_ceil(threads * 4);
    let chunks: Vec<Mutex<&mut [T]>> = output.chunks_mut(per * unit).map(Mutex::new).collect();
    pool.execute_chunked(chunks.len(), |range| {
        for i in range {
            // Each chunk is locked exactly once, so the lock is never contended; it is
            // poisoned only if `f` panicked, and that panic propagates from the pool.
            if let Ok(mut chunk) = chunks[i].lock() {
                f(i * per, &mut chunk);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_comes_from_the_setting_or_the_cores() {
        assert_eq!(budget(Some("3")), 3);
        assert_eq!(budget(Some(" 1 ")), 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(budget(Some("0")), cores);
        assert_eq!(budget(Some("many")), cores);
        assert_eq!(budget(None), cores);
        assert!(threads() >= 1);
    }

    #[test]
    fn par_map_keeps_the_order() {
        assert_eq!(par_map(vec![1, 2, 3], |x| x * 10), vec![10, 20, 30]);
        assert_eq!(par_map(Vec::<u8>::new(), |x| x), Vec::<u8>::new());
    }
}
