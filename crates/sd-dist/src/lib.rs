//! Data-parallel training primitives over libtorch's c10d process groups (`ProcessGroupGloo`
//! on CPU, `ProcessGroupNCCL` on CUDA), which `tch` does not expose: a small C++ shim
//! (`cpp/shim.cpp`) compiled by the build script when the backend headers exist.
//!
//! Owns: rendezvous through a c10d `TCPStore` ([`ProcessGroup::init`]), in-place all-reduce
//! ([`ProcessGroup::all_reduce_sum`], [`ProcessGroup::all_reduce_mean`]), broadcast and barrier,
//! each bounded by the group's timeout; the torchrun-style launch environment ([`LaunchEnv`]).
//! Does not own the training loop (sd-core's trainer uses this crate) nor process spawning
//! (the `train-network` tool). See docs/distributed.md.
//!
//! Without the headers (or with `SD_DIST_DISABLE=1`) the crate builds a stub whose
//! [`ProcessGroup::init`] returns [`Error::Unavailable`] saying how to enable it;
//! [`available_backends`] tells which backends this build has.

use std::time::Duration;

use tch::Tensor;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This build has no shim for the requested backend.
    #[error(
        "distributed training ({backend}) is unavailable in this build: {reason}; to enable Gloo install the gloo headers (Debian: apt-get install libgloo-dev, or set SD_GLOO_INCLUDE) and rebuild; NCCL needs libtorch_cuda and the CUDA/NCCL headers (SD_NCCL_INCLUDE)"
    )]
    Unavailable {
        /// The backend asked for.
        backend: Backend,
        /// Why the build lacks it.
        reason: String,
    },
    /// A c10d call failed (peer gone, timeout, rendezvous failure); the C++ message.
    #[error("{op} failed (rank {rank} of {world}): {message}")]
    Collective {
        /// The operation (`init`, `all_reduce`, `broadcast`, `barrier`).
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// The world size.
        world: usize,
        /// What libtorch said.
        message: String,
    },
    /// Bad arguments or launch environment.
    #[error("{0}")]
    Invalid(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// A c10d communication backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, TCP.
    Gloo,
    /// NCCL: CUDA tensors.
    Nccl,
}

impl Backend {
    /// The name used by `--ddp_backend` (`gloo`, `nccl`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// Parses `gloo` / `nccl` (any case).
    ///
    /// # Errors
    /// [`Error::Invalid`] for another name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(Error::Invalid(format!(
                "unknown DDP backend {other:?}: expected gloo or nccl"
            ))),
        }
    }

    /// Whether this build has the backend.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Gloo => cfg!(sd_dist_gloo),
            Backend::Nccl => cfg!(sd_dist_nccl),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The backends compiled into this build.
pub fn available_backends() -> Vec<Backend> {
    [Backend::Gloo, Backend::Nccl]
        .into_iter()
        .filter(|b| b.is_available())
        .collect()
}

/// Why a backend is missing from this build (empty when every backend is present).
pub fn missing_reason() -> &'static str {
    env!("SD_DIST_MISSING")
}

/// The torchrun launch environment of one worker: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `MASTER_ADDR`, `MASTER_PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes over all nodes.
    pub world_size: usize,
    /// Rank on this node (selects the CUDA device).
    pub local_rank: usize,
    /// Address of rank 0's TCPStore.
    pub master_addr: String,
    /// Port of rank 0's TCPStore.
    pub master_port: u16,
}

impl LaunchEnv {
    /// Reads the launch variables through `get` (e.g. `|k| std::env::var(k).ok()`). Returns
    /// `None` when `WORLD_SIZE` is unset (a plain single-process run).
    ///
    /// Defaults as torchrun's: `RANK` 0, `LOCAL_RANK` = `RANK`, `MASTER_ADDR` `127.0.0.1`,
    /// `MASTER_PORT` 29500.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the variable when a value does not parse or the rank is not
    /// below the world size.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |key: &str, v: &str| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| {
                Error::Invalid(format!(
                    "environment variable {key}={v:?}: expected a non-negative integer"
                ))
            })
        };
        let world_size = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(Error::Invalid(
                "environment variable WORLD_SIZE=0: expected at least 1".into(),
            ));
        }
        let rank = match get("RANK") {
            Some(v) => num("RANK", &v)?,
            None => 0,
        };
        if rank >= world_size {
            return Err(Error::Invalid(format!(
                "environment variable RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(v) => v.trim().parse::<u16>().map_err(|_| {
                Error::Invalid(format!(
                    "environment variable MASTER_PORT={v:?}: expected a port number (0-65535)"
                ))
            })?,
            None => 29500,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// [`LaunchEnv::from_vars`] over the process environment.
    ///
    /// # Errors
    /// As [`LaunchEnv::from_vars`].
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

#[cfg(sd_dist_shim)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    use torch_sys::C_tensor;

    unsafe extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn sddist_init(
            backend: c_int,
            master_addr: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            out: *mut *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn sddist_allreduce_sum(
            group: *mut c_void,
            t: *const C_tensor,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn sddist_broadcast(
            group: *mut c_void,
            t: *const C_tensor,
            root: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn sddist_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn sddist_free(group: *mut c_void);
        pub fn sddist_free_error(err: *mut c_char);
    }
}

/// One process's membership in a c10d process group.
///
/// Every collective must be called by all ranks in the same order. Each blocks until done or
/// until the group's timeout passes (a dead peer usually fails it sooner: its TCP connections
/// close); a failed collective leaves the group unusable, so callers should stop.
pub struct ProcessGroup {
    #[cfg(sd_dist_shim)]
    handle: *mut std::ffi::c_void,
    backend: Backend,
    rank: usize,
    world: usize,
}

// SAFETY: the c10d group is used by one thread at a time (`&mut`-free API, but the trainer
// calls it from one thread); c10d backends are thread-safe for sequential use from any thread.
#[cfg(sd_dist_shim)]
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl ProcessGroup {
    /// Joins the group: rank 0 serves a c10d `TCPStore` on `master_addr:port`, the others
    /// connect to it (retrying until `timeout`), then the backend connects every pair of ranks.
    /// Gloo binds to `GLOO_SOCKET_IFNAME` when set, to 127.0.0.1 for a loopback master address,
    /// else to the address of this machine's hostname.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the build lacks `backend`; [`Error::Invalid`] for a rank not
    /// below `world`; [`Error::Collective`] when the rendezvous fails or times out.
    pub fn init(
        backend: Backend,
        rank: usize,
        world: usize,
        master_addr: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::Invalid(format!(
                "rank {rank} is not below the world size {world}"
            )));
        }
        if !backend.is_available() {
            return Err(Error::Unavailable {
                backend,
                reason: missing_reason().to_owned(),
            });
        }
        Self::init_shim(backend, rank, world, master_addr, port, timeout)
    }

    #[cfg(not(sd_dist_shim))]
    fn init_shim(
        backend: Backend,
        _rank: usize,
        _world: usize,
        _master_addr: &str,
        _port: u16,
        _timeout: Duration,
    ) -> Result<Self> {
        Err(Error::Unavailable {
            backend,
            reason: missing_reason().to_owned(),
        })
    }

    #[cfg(sd_dist_shim)]
    fn init_shim(
        backend: Backend,
        rank: usize,
        world: usize,
        master_addr: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Self> {
        let addr = std::ffi::CString::new(master_addr)
            .map_err(|_| Error::Invalid(format!("master address {master_addr:?} contains NUL")))?;
        let to_int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| Error::Invalid(format!("{what} {v} is too large")))
        };
        let mut handle = std::ptr::null_mut();
        let mut err = std::ptr::null_mut();
        let timeout_ms = i64::try_from(timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        // SAFETY: all pointers are valid for the call; the shim writes `handle` or `err`.
        let rc = unsafe {
            ffi::sddist_init(
                match backend {
                    Backend::Gloo => 0,
                    Backend::Nccl => 1,
                },
                addr.as_ptr(),
                i32::from(port),
                to_int(rank, "rank")?,
                to_int(world, "world size")?,
                timeout_ms,
                &mut handle,
                &mut err,
            )
        };
        let group = Self {
            handle,
            backend,
            rank,
            world,
        };
        if rc != 0 {
            return Err(group.error("init", err));
        }
        Ok(group)
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Whether this is rank 0 (the one that writes files).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    #[cfg(sd_dist_shim)]
    fn error(&self, op: &'static str, err: *mut std::ffi::c_char) -> Error {
        let message = if err.is_null() {
            "(no message)".to_owned()
        } else {
            // SAFETY: the shim returns a NUL-terminated malloc'ed string, freed right after.
            let m = unsafe { std::ffi::CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: `err` came from the shim's malloc.
            unsafe { ffi::sddist_free_error(err) };
            m
        };
        Error::Collective {
            op,
            rank: self.rank,
            world: self.world,
            message,
        }
    }

    fn check_tensor(&self, t: &Tensor) -> Result<()> {
        if !t.is_contiguous() {
            return Err(Error::Invalid(
                "collectives need a contiguous tensor".into(),
            ));
        }
        let cuda = t.device().is_cuda();
        match (self.backend, cuda) {
            (Backend::Gloo, true) => Err(Error::Invalid(
                "the gloo backend takes CPU tensors here; use nccl for CUDA".into(),
            )),
            (Backend::Nccl, false) => {
                Err(Error::Invalid("the nccl backend needs CUDA tensors".into()))
            }
            _ => Ok(()),
        }
    }

    /// Sums `t` over all ranks, in place (every rank ends with the sum).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a non-contiguous tensor or one on the wrong device for the
    /// backend; [`Error::Collective`] when a peer is gone or the timeout passes.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.check_tensor(t)?;
        self.all_reduce_shim(t)
    }

    /// Averages `t` over all ranks, in place: sum, then divide by the world size.
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce_sum`].
    pub fn all_reduce_mean(&self, t: &Tensor) -> Result<()> {
        self.all_reduce_sum(t)?;
        let mut t = t.shallow_clone();
        let _ = t.g_div_scalar_(self.world as f64);
        Ok(())
    }

    /// Replaces `t` on every rank with rank `root`'s `t`, in place.
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce_sum`], and [`Error::Invalid`] for a root not below the
    /// world size.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.check_tensor(t)?;
        if root >= self.world {
            return Err(Error::Invalid(format!(
                "broadcast root {root} is not below the world size {}",
                self.world
            )));
        }
        self.broadcast_shim(t, root)
    }

    /// Waits until every rank has reached the barrier.
    ///
    /// # Errors
    /// [`Error::Collective`] when a peer is gone or the timeout passes.
    pub fn barrier(&self) -> Result<()> {
        self.barrier_shim()
    }

    #[cfg(not(sd_dist_shim))]
    fn all_reduce_shim(&self, _t: &Tensor) -> Result<()> {
        Err(self.unavailable())
    }
    #[cfg(not(sd_dist_shim))]
    fn broadcast_shim(&self, _t: &Tensor, _root: usize) -> Result<()> {
        Err(self.unavailable())
    }
    #[cfg(not(sd_dist_shim))]
    fn barrier_shim(&self) -> Result<()> {
        Err(self.unavailable())
    }
    #[cfg(not(sd_dist_shim))]
    fn unavailable(&self) -> Error {
        Error::Unavailable {
            backend: self.backend,
            reason: missing_reason().to_owned(),
        }
    }

    #[cfg(sd_dist_shim)]
    fn all_reduce_shim(&self, t: &Tensor) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `handle` is a live group; `t` is a valid tensor for the call.
        let rc = unsafe { ffi::sddist_allreduce_sum(self.handle, t.as_ptr(), &mut err) };
        if rc != 0 {
            return Err(self.error("all_reduce", err));
        }
        Ok(())
    }

    #[cfg(sd_dist_shim)]
    fn broadcast_shim(&self, t: &Tensor, root: usize) -> Result<()> {
        let mut err = std::ptr::null_mut();
        let root = i32::try_from(root).map_err(|_| Error::Invalid("root too large".into()))?;
        // SAFETY: `handle` is a live group; `t` is a valid tensor for the call.
        let rc = unsafe { ffi::sddist_broadcast(self.handle, t.as_ptr(), root, &mut err) };
        if rc != 0 {
            return Err(self.error("broadcast", err));
        }
        Ok(())
    }

    #[cfg(sd_dist_shim)]
    fn barrier_shim(&self) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `handle` is a live group.
        let rc = unsafe { ffi::sddist_barrier(self.handle, &mut err) };
        if rc != 0 {
            return Err(self.error("barrier", err));
        }
        Ok(())
    }
}

#[cfg(sd_dist_shim)]
impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle came from `sddist_init` and is freed once.
            unsafe { ffi::sddist_free(self.handle) };
        }
    }
}

/// Where a bucket is reduced: CUDA tensors stay on the GPU for NCCL; Gloo gets CPU copies.
fn comm_device(group: &ProcessGroup, device: tch::Device) -> tch::Device {
    match group.backend() {
        Backend::Nccl => device,
        Backend::Gloo => tch::Device::Cpu,
    }
}

/// Flattens the gradients of `params` into one f32 bucket (an undefined gradient counts as
/// zeros), all-reduces the bucket with `extra` values appended (e.g. per-rank loss sums),
/// sums over ranks, and writes the summed gradients back into each `param.grad()`.
/// Returns the summed `extra` values.
///
/// Callers pre-scale their loss so that the sum is the global mean gradient (each rank's
/// loss × its share of the global batch), which is exact also for uneven shards. Parameters
/// whose gradient is undefined on every rank keep an undefined gradient only if the caller
/// made them defined beforehand; this function needs every gradient defined to write back and
/// returns [`Error::Invalid`] otherwise.
///
/// # Errors
/// [`Error::Invalid`] for an undefined gradient; errors of [`ProcessGroup::all_reduce_sum`].
pub fn all_reduce_grads(
    group: &ProcessGroup,
    params: &[Tensor],
    extra: &[f64],
) -> Result<Vec<f64>> {
    let Some(first) = params.first() else {
        return Ok(Vec::new());
    };
    let device = first.device();
    let mut parts = Vec::with_capacity(params.len() + 1);
    for (i, p) in params.iter().enumerate() {
        let g = p.grad();
        if !g.defined() {
            return Err(Error::Invalid(format!(
                "parameter {i} has no gradient to all-reduce"
            )));
        }
        parts.push(g.detach().to_kind(tch::Kind::Float).reshape([-1]));
    }
    let extra_f32: Vec<f32> = extra.iter().map(|&x| x as f32).collect();
    parts.push(Tensor::from_slice(&extra_f32).to_device(device));
    let bucket = Tensor::cat(&parts, 0)
        .to_device(comm_device(group, device))
        .contiguous();
    group.all_reduce_sum(&bucket)?;
    let mut offset = 0i64;
    for p in params {
        let mut g = p.grad();
        let n = g.numel() as i64;
        let summed = bucket
            .narrow(0, offset, n)
            .view_as(&g)
            .to_device(device)
            .to_kind(g.kind());
        tch::no_grad(|| g.copy_(&summed));
        offset += n;
    }
    let tail = bucket
        .narrow(0, offset, extra.len() as i64)
        .to_device(tch::Device::Cpu);
    let out: Vec<f32> = Vec::<f32>::try_from(&tail)
        .map_err(|e| Error::Invalid(format!("reading the reduced values: {e}")))?;
    Ok(out.into_iter().map(f64::from).collect())
}

/// Flattens `params` into one bucket, broadcasts rank `root`'s values, and copies them back
/// (so every replica starts from the same weights).
///
/// # Errors
/// As [`ProcessGroup::broadcast`].
pub fn broadcast_params(group: &ProcessGroup, params: &[Tensor], root: usize) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let parts: Vec<Tensor> = params
        .iter()
        .map(|p| p.detach().to_kind(tch::Kind::Float).reshape([-1]))
        .collect();
    let device = params[0].device();
    let bucket = Tensor::cat(&parts, 0)
        .to_device(comm_device(group, device))
        .contiguous();
    group.broadcast(&bucket, root)?;
    let mut offset = 0i64;
    for p in params {
        let n = p.numel() as i64;
        let mut p = p.shallow_clone();
        let v = bucket
            .narrow(0, offset, n)
            .view_as(&p)
            .to_device(p.device())
            .to_kind(p.kind());
        tch::no_grad(|| p.copy_(&v));
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn launch_env_reads_torchrun_variables() {
        let vars = |m: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                m.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(LaunchEnv::from_vars(vars(&[])).unwrap(), None);
        let e = LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "4"), ("RANK", "3")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            e,
            LaunchEnv {
                rank: 3,
                world_size: 4,
                local_rank: 3,
                master_addr: "127.0.0.1".into(),
                master_port: 29500
            }
        );
        let e = LaunchEnv::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.local_rank, e.master_addr.as_str(), e.master_port),
            (0, "10.0.0.1", 1234)
        );
        let err = LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable RANK=2 is not below WORLD_SIZE=2"
        );
        let err = LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "x")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable WORLD_SIZE=\"x\": expected a non-negative integer"
        );
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!(Backend::parse("GLOO").unwrap(), Backend::Gloo);
        assert_eq!(Backend::parse("nccl").unwrap(), Backend::Nccl);
        assert!(Backend::parse("mpi").is_err());
    }

    #[test]
    fn a_world_of_one_reduces_to_itself_or_reports_unavailable() {
        let port = free_port();
        match ProcessGroup::init(
            Backend::Gloo,
            0,
            1,
            "127.0.0.1",
            port,
            Duration::from_secs(20),
        ) {
            Ok(g) => {
                let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
                g.all_reduce_mean(&t).unwrap();
                assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0, 3.0]);
                g.broadcast(&t, 0).unwrap();
                g.barrier().unwrap();
            }
            Err(e) => {
                assert!(!Backend::Gloo.is_available());
                assert!(e.to_string().contains("unavailable in this build"), "{e}");
            }
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(29511)
    }
}
