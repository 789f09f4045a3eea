//! Data-parallel launch (docs/distributed.md): the torchrun environment (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), `--num_processes N` (this binary re-run as N
//! local workers), `--ddp_backend`, `--ddp_timeout`, and the per-rank changes to the run
//! (device, global batch, metadata).

use std::ffi::OsString;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sd_core::train::trainer::{StepReport, TrainConfig, TrainObserver};
use sd_data::dataset::DatasetScan;
use sd_dist::{Backend, LaunchEnv, ProcessGroup};

use crate::args::Args;

/// Test hook: `SD_DIST_TEST_ABORT=<rank>:<step>` makes that worker abort after that optimiser
/// step (tools/train-network/tests/distributed.rs checks the run then fails cleanly).
const TEST_ABORT: &str = "SD_DIST_TEST_ABORT";

/// Validated launch options.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `--num_processes` (1 when absent).
    pub num_processes: usize,
    /// `--ddp_backend` (None: nccl on CUDA, gloo on CPU).
    pub backend: Option<Backend>,
    /// `--ddp_timeout` (30 minutes when absent).
    pub timeout: Duration,
    /// The torchrun environment of this process, when it is a worker.
    pub env: Option<LaunchEnv>,
}

impl Launch {
    /// Reads the options and the environment.
    ///
    /// # Errors
    /// A bad `--num_processes`, `--ddp_timeout`, or launch variable.
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let o = &args.optimization;
        let num_processes = o.num_processes.unwrap_or(1);
        if num_processes == 0 {
            bail!("--num_processes 0: expected at least 1");
        }
        let timeout = match o.ddp_timeout {
            None => Duration::from_secs(30 * 60),
            Some(m) if m > 0 => Duration::from_secs(m as u64 * 60),
            Some(m) => bail!("--ddp_timeout {m}: expected a positive number of minutes"),
        };
        let backend = o
            .ddp_backend
            .as_deref()
            .map(Backend::parse)
            .transpose()
            .context("--ddp_backend")?;
        let env = LaunchEnv::from_env().context("reading the torchrun launch environment")?;
        Ok(Self {
            num_processes,
            backend,
            timeout,
            env,
        })
    }

    /// Whether this process should spawn the workers (`--num_processes N > 1`, not itself a
    /// worker).
    pub fn spawns(&self) -> bool {
        self.num_processes > 1 && self.env.is_none()
    }

    /// Rank of this process (0 without a launch environment).
    pub fn rank(&self) -> usize {
        self.env.as_ref().map_or(0, |e| e.rank)
    }
}

/// Runs `--num_processes` workers of this binary with the same arguments on this machine
/// (rank 0's store on a free loopback port), waits for them, and stops the others as soon as
/// one fails. Returns the exit code: rank 0's, or 1 when a worker failed.
///
/// # Errors
/// The binary cannot be found or a worker cannot be started.
pub fn spawn_local(launch: &Launch) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the train-network binary")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("finding a free port for the rendezvous")?;
    let n = launch.num_processes;
    tracing::info!("starting {n} workers (gloo/nccl rendezvous on 127.0.0.1:{port})");
    // Ctrl-C reaches every worker (same process group); they save and stop together, and this
    // process waits for them instead of dying first.
    let _ = ctrlc::set_handler(|| {});
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if rank > 0 && std::env::var_os("RUST_LOG").is_none() {
            // Rank 0 reports progress; the others only warnings and errors.
            cmd.env("RUST_LOG", "warn");
        }
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e).with_context(|| format!("starting worker {rank}"));
            }
        }
    }
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut failed: Option<(usize, ExitStatus)> = None;
    let mut failed_at = None;
    loop {
        for (rank, slot) in children.iter_mut().enumerate() {
            if let Some(child) = slot
                && let Ok(Some(status)) = child.try_wait()
            {
                statuses[rank] = Some(status);
                *slot = None;
                if !status.success() && failed.is_none() && status.code() != Some(130) {
                    failed = Some((rank, status));
                    failed_at = Some(Instant::now());
                }
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        // The survivors of a failed worker normally stop by themselves (their next collective
        // fails); after a grace period they are killed.
        if failed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(15)) {
            stop_all(&mut children);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some((rank, status)) = failed {
        bail!(
            "worker {rank} of {n} failed ({}); the other workers were stopped",
            describe(status)
        );
    }
    let code = statuses[0].and_then(|s| s.code()).unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn stop_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exit code {c}"),
        None => "no exit code".into(),
    }
}

/// Joins the process group of a launched worker (world size > 1) and adapts the run: device
/// `cuda:LOCAL_RANK` on CUDA, the scan's batch sizes multiplied by the world size (the global
/// batch every rank plans; each trains on its slice), `ss_total_batch_size` over all ranks.
/// Returns `None` for a single-process run.
///
/// # Errors
/// A backend this build lacks or that does not fit the device, a failed rendezvous.
pub fn join(
    launch: &Launch,
    cfg: &mut TrainConfig,
    scan: &mut DatasetScan,
) -> anyhow::Result<Option<ProcessGroup>> {
    // The launch variables win over --num_processes (a worker, or a world of one).
    let Some(env) = launch.env.as_ref().filter(|e| e.world_size > 1) else {
        return Ok(None);
    };
    let cuda = cfg.device.is_cuda();
    let backend = launch
        .backend
        .unwrap_or(if cuda { Backend::Nccl } else { Backend::Gloo });
    if cuda {
        let gpus = tch::Cuda::device_count().max(1) as usize;
        cfg.device = tch::Device::Cuda(env.local_rank % gpus);
    } else if backend == Backend::Nccl {
        bail!("--ddp_backend nccl needs CUDA GPUs; this run is on the CPU: use --ddp_backend gloo");
    }
    tracing::info!(
        "rank {} of {} ({backend}, device {:?}), rendezvous at {}:{}",
        env.rank,
        env.world_size,
        cfg.device,
        env.master_addr,
        env.master_port
    );
    let group = ProcessGroup::init(
        backend,
        env.rank,
        env.world_size,
        &env.master_addr,
        env.master_port,
        launch.timeout,
    )
    .context("joining the data-parallel process group")?;
    let w = env.world_size as u32;
    for ds in &mut scan.datasets {
        ds.config.batch_size = ds.config.batch_size.max(1) * w;
    }
    if let Some(total) = cfg.dataset_metadata.get_mut("ss_total_batch_size")
        && let Ok(v) = total.parse::<u64>()
    {
        *total = (v * u64::from(w)).to_string();
    }
    Ok(Some(group))
}

/// The observer of ranks other than 0: silent (rank 0 reports), with the test hook.
pub struct Worker {
    /// This rank.
    pub rank: usize,
}

impl TrainObserver for Worker {
    fn step(&mut self, report: &StepReport) {
        if let Ok(v) = std::env::var(TEST_ABORT)
            && v.split_once(':')
                .is_some_and(|(r, s)| r == self.rank.to_string() && s == report.step.to_string())
        {
            tracing::error!(
                "{TEST_ABORT}: rank {} aborts at step {}",
                self.rank,
                report.step
            );
            std::process::abort();
        }
    }
}
