//! What `tch` 0.26 lacks from libtorch, through a small C++ shim (`cpp/shim.cpp`, compiled by
//! this crate's build script against the headers of the libtorch torch-sys links).
//!
//! Owns: gradient checkpointing ([`checkpoint`]), the grad-mode query
//! ([`grad_mode_enabled`]) and the CUDA device-memory query ([`cuda_memory_info`]). Does not
//! own any model code; sd-core wraps its blocks with [`checkpoint`] when training asks for it.
//!
//! # Gradient checkpointing
//! tch has no custom autograd functions and no way to seed a backward pass with a gradient, so
//! the shim implements one `torch::autograd::Function`: its forward runs a Rust closure with
//! grad mode off (no activations kept), saving the inputs, the extra parameters and the RNG
//! state; its backward re-runs the closure with grad mode on from the saved inputs (same
//! random numbers), and returns `torch::autograd::grad(outputs, inputs + params, upstream)`.
//! Gradients equal plain autograd's up to summation order (see docs/architecture.md).

use std::ffi::{c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use tch::Tensor;
use torch_sys::C_tensor;

/// Errors of the shim.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch threw, or the checkpointed closure panicked during forward.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

type RunFn = unsafe extern "C" fn(*mut c_void, *const *mut C_tensor, i64, *mut c_void) -> c_int;
type DropFn = unsafe extern "C" fn(*mut c_void);

unsafe extern "C" {
    fn tchext_sink_push(sink: *mut c_void, t: *const C_tensor);
    fn tchext_sink_error(sink: *mut c_void, message: *const c_char, len: usize);
    fn tchext_free_error(err: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    fn tchext_checkpoint(
        closure: *mut c_void,
        run: RunFn,
        drop: DropFn,
        inputs: *const *const C_tensor,
        n_inputs: i64,
        params: *const *const C_tensor,
        n_params: i64,
        outputs: *mut *mut *mut C_tensor,
        n_outputs: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn tchext_free_outputs(outputs: *mut *mut C_tensor);
    fn tchext_grad_mode_enabled() -> c_int;
    fn tchext_cuda_mem_get_info(device: c_int, free: *mut usize, total: *mut usize) -> c_int;
}

/// The closure type a checkpoint node owns: inputs in, outputs out.
type Closure = Box<dyn Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static>;

unsafe extern "C" fn run_trampoline(
    closure: *mut c_void,
    inputs: *const *mut C_tensor,
    n_inputs: i64,
    sink: *mut c_void,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `closure` is the `Box<Closure>` leaked by `checkpoint`, alive until
        // `drop_trampoline`; C++ only calls this while its holder is alive.
        let f = unsafe { &*(closure as *const Closure) };
        let inputs: Vec<Tensor> = (0..n_inputs as usize)
            .map(|i| {
                // SAFETY: C++ passes `n_inputs` valid `at::Tensor*` that outlive this call;
                // `clone_from_ptr` makes our own handle (a shallow clone) of each.
                unsafe { Tensor::clone_from_ptr(*inputs.add(i)) }
            })
            .collect();
        let outputs = f(&inputs);
        for t in &outputs {
            // SAFETY: `sink` is the C++ `Sink*` of this call; the tensor is copied there.
            unsafe { tchext_sink_push(sink, t.as_ptr()) };
        }
    }));
    match result {
        Ok(()) => 0,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            // SAFETY: `sink` is valid for this call; the message is copied.
            unsafe { tchext_sink_error(sink, msg.as_ptr().cast(), msg.len()) };
            1
        }
    }
}

unsafe extern "C" fn drop_trampoline(closure: *mut c_void) {
    // A panicking Drop must not unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: called exactly once, by the holder's destructor, on the leaked box.
        drop(unsafe { Box::from_raw(closure as *mut Closure) });
    }));
}

/// Whether autograd records operations on this thread (`at::GradMode::is_enabled`; false
/// inside `tch::no_grad`).
pub fn grad_mode_enabled() -> bool {
    // SAFETY: a plain query without arguments.
    unsafe { tchext_grad_mode_enabled() != 0 }
}

/// Free and total memory of CUDA device `index` in bytes (`cudaMemGetInfo`, looked up among the
/// already loaded libraries: libtorch links the CUDA runtime dynamically). `None` when no CUDA
/// runtime is loaded (a CPU-only libtorch), when the query fails (no driver, no such device), or
/// when `index` does not fit a C int. tch exposes no memory query; this avoids a CUDA/NVML
/// dependency at build time.
pub fn cuda_memory_info(index: usize) -> Option<(u64, u64)> {
    let device = c_int::try_from(index).ok()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both out-pointers are valid for writes for the duration of the call; the shim only
    // calls CUDA runtime functions found by dlsym with their documented signatures.
    let rc = unsafe { tchext_cuda_mem_get_info(device, &mut free, &mut total) };
    (rc == 0).then_some((free as u64, total as u64))
}

/// Runs `f(inputs)` as one checkpointed autograd node: no intermediate activation of `f` is kept;
/// during backward `f` runs again on the saved inputs (with the CPU and input-device RNG states of
/// the first run) to compute the gradients of `inputs` and `params`.
///
/// `params` are the trainable tensors `f` uses that are not among `inputs` (e.g. LoRA weights
/// attached to the block's layers): listing them makes the node's outputs require grad even when
/// no input does, and gives them their gradients. A trainable tensor used by `f` but not listed
/// gets no gradient from this node. Listing more than `f` uses is harmless (they get none).
///
/// When grad mode is off, or neither an input nor a parameter requires grad, `f` simply runs.
///
/// `f` must be deterministic given the inputs and the RNG state, and must hold its own handles
/// (`shallow_clone`) of the weights it uses: it is kept until the graph is freed and may run on
/// libtorch's autograd thread for the device.
///
/// # Errors
/// [`Error::Checkpoint`] when `f` panicked during the first run or libtorch threw. A panic
/// during the recompute surfaces as an error of the backward call (tch's `backward` panics).
pub fn checkpoint<F>(f: F, inputs: &[&Tensor], params: &[Tensor]) -> Result<Vec<Tensor>>
where
    F: Fn(&[Tensor]) -> Vec<Tensor> + Send + 'static,
{
    let needs_node = grad_mode_enabled()
        && (inputs.iter().any(|t| t.defined() && t.requires_grad())
            || params.iter().any(|t| t.defined() && t.requires_grad()));
    if !needs_node {
        let owned: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        return catch_unwind(AssertUnwindSafe(|| f(&owned)))
            .map_err(|_| Error::Checkpoint("checkpointed function panicked".to_owned()));
    }
    let closure: Box<Closure> = Box::new(Box::new(f));
    let raw = Box::into_raw(closure) as *mut c_void;
    let in_ptrs: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let param_ptrs: Vec<*const C_tensor> = params.iter().map(|t| t.as_ptr()).collect();
    let mut out_ptr: *mut *mut C_tensor = std::ptr::null_mut();
    let mut n_out: i64 = 0;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: the tensor pointers are valid for the call (borrowed from live `Tensor`s); the
    // closure's ownership passes to C++, which frees it through `drop_trampoline`.
    let rc = unsafe {
        tchext_checkpoint(
            raw,
            run_trampoline,
            drop_trampoline,
            in_ptrs.as_ptr(),
            in_ptrs.len() as i64,
            param_ptrs.as_ptr(),
            param_ptrs.len() as i64,
            &mut out_ptr,
            &mut n_out,
            &mut err,
        )
    };
    if rc != 0 {
        let msg = if err.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: `err` is a NUL-terminated string malloc'd by the shim; freed right after.
            let s = unsafe { std::ffi::CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned();
            unsafe { tchext_free_error(err) };
            s
        };
        return Err(Error::Checkpoint(msg));
    }
    let outputs = (0..n_out as usize)
        .map(|i| {
            // SAFETY: the shim allocated `n_out` new `at::Tensor*` that we now own.
            unsafe { Tensor::from_ptr(*out_ptr.add(i)) }
        })
        .collect();
    // SAFETY: the array itself was malloc'd by the shim; its elements are now owned above.
    unsafe { tchext_free_outputs(out_ptr) };
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Without a GPU the query answers `None` (here: the CUDA runtime is loaded, as libtorch
    /// links it, but reports no device); with one, plausible figures.
    #[test]
    fn cuda_memory_query() {
        if tch::Cuda::is_available() {
            let (free, total) = cuda_memory_info(0).expect("device 0");
            assert!(total > 0 && free <= total, "{free} of {total}");
        } else {
            assert_eq!(cuda_memory_info(0), None);
        }
        assert_eq!(cuda_memory_info(usize::MAX), None);
    }

    /// A small residual MLP chain: the checkpointed gradients of the parameters and of the
    /// input are bit-identical to plain autograd's.
    #[test]
    fn checkpoint_gradients_equal_plain_autograd() {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let ws: Vec<Tensor> = (0..3)
            .map(|_| (Tensor::randn([8, 8], opts) * 0.3).set_requires_grad(true))
            .collect();
        let x0 = Tensor::randn([4, 8], opts);
        let block = |w: &Tensor, x: &Tensor| x + x.matmul(w).tanh();

        let run = |ckpt: bool| -> (Vec<Tensor>, Tensor) {
            for w in &ws {
                let mut g = w.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let x = x0.detach().set_requires_grad(true);
            let mut h = x.shallow_clone();
            for w in &ws {
                h = if ckpt {
                    let wc = w.shallow_clone();
                    checkpoint(
                        move |i| vec![i[0].shallow_clone() + i[0].matmul(&wc).tanh()],
                        &[&h],
                        std::slice::from_ref(w),
                    )
                    .expect("checkpoint")
                    .remove(0)
                } else {
                    block(w, &h)
                };
            }
            (&h * &h).sum(Kind::Float).backward();
            (
                ws.iter().map(|w| w.grad().copy()).collect(),
                x.grad().copy(),
            )
        };
        let (plain, plain_x) = run(false);
        let (ckpt, ckpt_x) = run(true);
        for (a, b) in plain.iter().zip(&ckpt) {
            assert_eq!(max_diff(a, b), 0.0);
        }
        assert_eq!(max_diff(&plain_x, &ckpt_x), 0.0);
    }

    /// Parameters passed to the node get gradients even when no input requires grad, and the
    /// recompute replays the forward's random numbers (dropout).
    #[test]
    fn checkpoint_params_without_input_grad_and_rng_replay() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([6, 6], opts).set_requires_grad(true);
        let x = Tensor::randn([5, 6], opts);
        let f = |w: &Tensor, x: &Tensor| x.matmul(w).dropout(0.5, true).sum(Kind::Float);

        tch::manual_seed(11);
        f(&w, &x).backward();
        let plain = w.grad().copy();
        let mut g = w.grad();
        let _ = g.zero_();

        tch::manual_seed(11);
        let wc = w.shallow_clone();
        let out = checkpoint(
            move |i| vec![i[0].matmul(&wc).dropout(0.5, true).sum(Kind::Float)],
            &[&x],
            std::slice::from_ref(&w),
        )
        .expect("checkpoint");
        assert!(out[0].requires_grad());
        // Draw more random numbers before backward: the recompute must not see them.
        let _ = Tensor::rand([100], opts);
        out[0].backward();
        assert_eq!(max_diff(&plain, &w.grad()), 0.0);
    }

    /// A panic inside the closure comes back as an error, not as an abort.
    #[test]
    fn checkpoint_panic_is_an_error() {
        let w = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let r = checkpoint(|_| panic!("boom"), &[&x], std::slice::from_ref(&w));
        let err = r.expect_err("a panic is an error").to_string();
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn grad_mode_follows_no_grad() {
        assert!(grad_mode_enabled());
        tch::no_grad(|| assert!(!grad_mode_enabled()));
    }
}
