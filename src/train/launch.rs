//! Starting a data-parallel run: which rank this process is (from torchrun's or Slurm's
//! variables, read once by the command line and handed down as [`Rendezvous`]), and
//! `carp train --nproc-per-node N`, which starts the N workers of a machine and watches them.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::bail;
use crate::device::tcp::Rendezvous;
use crate::error::{Error, Result};

/// The default `--master-addr`: a single machine.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";

/// The default `--master-port` (torchrun's).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The default `--dist-timeout` in seconds.
pub const DEFAULT_DIST_TIMEOUT_S: f64 = 120.0;

/// This process's place in a data-parallel run, as its launcher described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank within its machine: which GPU it takes.
    pub local_rank: usize,
    /// MASTER_ADDR / MASTER_PORT when set.
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// Which launcher's variables these were (for messages).
    pub source: &'static str,
}

fn parse_var<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>> {
    match get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            Error::Config(format!(
                "the environment variable {name}={v:?} is not a number: fix the launcher's \
                 environment"
            ))
        }),
    }
}

/// MASTER_ADDR (an empty one counts as unset) and MASTER_PORT when set (`get` reads a
/// variable).
pub fn master_from_env(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<(Option<String>, Option<u16>)> {
    Ok((
        get("MASTER_ADDR").filter(|a| !a.trim().is_empty()),
        parse_var::<u16>(get, "MASTER_PORT")?,
    ))
}

/// The rank, world size and local rank a launcher set in the environment (`get` reads a
/// variable): torchrun's RANK, WORLD_SIZE, LOCAL_RANK (carp's own launcher sets the same), else
/// Slurm's SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID inside an `srun` job step (a
/// batch script's own variables are not a job step and do not count). None: no launcher, a
/// single process.
pub fn world_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>> {
    let (master_addr, master_port) = master_from_env(get)?;
    let torch = (
        parse_var::<usize>(get, "RANK")?,
        parse_var::<usize>(get, "WORLD_SIZE")?,
    );
    let (rank, world, local, source) = match torch {
        (Some(r), Some(w)) => (
            r,
            w,
            parse_var::<usize>(get, "LOCAL_RANK")?.unwrap_or(0),
            "torchrun (RANK, WORLD_SIZE)",
        ),
        (Some(_), None) | (None, Some(_)) => bail!(
            Config,
            "only one of RANK and WORLD_SIZE is set: a launcher sets both (or neither, for a \
             single process)"
        ),
        (None, None) => match (
            parse_var::<usize>(get, "SLURM_PROCID")?,
            parse_var::<usize>(get, "SLURM_STEP_NUM_TASKS")?,
        ) {
            (Some(r), Some(w)) => (
                r,
                w,
                parse_var::<usize>(get, "SLURM_LOCALID")?.unwrap_or(0),
                "Slurm (SLURM_PROCID, SLURM_STEP_NUM_TASKS)",
            ),
            _ => return Ok(None),
        },
    };
    if world == 0 || rank >= world {
        bail!(
            Config,
            "{source}: rank {rank} in a world of {world}: the rank must be below the world size"
        );
    }
    Ok(Some(WorldEnv {
        rank,
        world,
        local_rank: local,
        master_addr,
        master_port,
        source,
    }))
}

impl WorldEnv {
    /// The rendezvous of this rank: `--master-addr` / `--master-port` when given, else the
    /// environment's, else (a single machine) 127.0.0.1 and 29500. Several machines need the
    /// master's address: its absence is an error that says so.
    pub fn rendezvous(
        &self,
        addr_flag: Option<&str>,
        port_flag: Option<u16>,
        timeout: Duration,
    ) -> Result<Rendezvous> {
        let master_addr = match (addr_flag, &self.master_addr) {
            (Some(a), _) => a.to_string(),
            (None, Some(a)) => a.clone(),
            (None, None) if self.source.starts_with("Slurm") && self.world > 1 => bail!(
                Config,
                "under Slurm, rank 0's host is not known: export MASTER_ADDR (e.g. \
                 MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)) or \
                 pass --master-addr"
            ),
            (None, None) => DEFAULT_MASTER_ADDR.to_string(),
        };
        Ok(Rendezvous {
            rank: self.rank,
            world: self.world,
            master_addr,
            master_port: port_flag
                .or(self.master_port)
                .unwrap_or(DEFAULT_MASTER_PORT),
            timeout,
        })
    }
}

/// What `--nproc-per-node` starts: `nproc` workers on this machine, node `node_rank` of
/// `nnodes`, meeting at `master_addr:master_port`.
#[derive(Clone, Debug)]
pub struct LaunchPlan {
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchPlan {
    pub fn world(&self) -> usize {
        self.nproc * self.nnodes
    }

    /// Refuses a plan that cannot run: no worker, a node rank outside the nodes, a global batch
    /// that does not divide by the world size. Checked before anything starts.
    pub fn validate(&self, batch: usize) -> Result<()> {
        if self.nproc == 0 || self.nnodes == 0 {
            bail!(Config, "--nproc-per-node and --nnodes must be at least 1");
        }
        if self.node_rank >= self.nnodes {
            bail!(
                Config,
                "--node-rank {} with --nnodes {}: node ranks are 0..{}",
                self.node_rank,
                self.nnodes,
                self.nnodes
            );
        }
        check_batch_divides(batch, self.world())
    }
}

/// `--batch` is the global batch: every rank takes batch / world images per step.
pub fn check_batch_divides(batch: usize, world: usize) -> Result<()> {
    if world > 1 && !batch.is_multiple_of(world) {
        bail!(
            Config,
            "--batch {batch} (the global batch) does not divide by the world size {world}: every \
             rank takes the same share; pick a multiple of {world} (e.g. {})",
            (batch / world).max(1) * world
        );
    }
    Ok(())
}

/// The flags of the launcher itself, which the workers do not get (with their value).
const LAUNCHER_FLAGS: [&str; 3] = ["--nproc-per-node", "--nnodes", "--node-rank"];

/// `args` without the launcher's own flags (`--flag V` and `--flag=V` forms).
pub fn worker_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = a.to_string_lossy();
        if LAUNCHER_FLAGS.contains(&s.as_ref()) {
            skip_value = true;
            continue;
        }
        if LAUNCHER_FLAGS
            .iter()
            .any(|f| s.starts_with(&format!("{f}=")))
        {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// The last signal (SIGINT or SIGTERM) the launcher received, 0 for none.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// How long the other workers get to stop on their own (and report what they saw) after one
/// fails, before they are terminated.
const GRACE: Duration = Duration::from_secs(5);

/// Starts the plan's workers (`exe` with `args`, each with RANK, WORLD_SIZE, LOCAL_RANK,
/// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set) and waits for them. Ctrl-C and SIGTERM
/// are passed on to every worker. When a worker fails, the others get a few seconds to stop
/// (they notice on their own) and are then terminated; the error names the first rank that
/// failed. `say` prints the launcher's own lines.
pub fn launch(
    plan: &LaunchPlan,
    exe: &Path,
    args: &[OsString],
    say: &dyn Fn(String),
) -> Result<()> {
    let world = plan.world();
    // SAFETY: `on_signal` only stores into an atomic, which is async-signal-safe; the
    // handlers are reset to the default in the workers by exec.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(plan.nproc);
    for local in 0..plan.nproc {
        let rank = plan.node_rank * plan.nproc + local;
        let mut cmd = Command::new(exe);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe: a worker gets SIGTERM if the launcher itself dies
        // (killed by the OOM killer, say), instead of running on without supervision.
        #[cfg(target_os = "linux")]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", plan.nproc.to_string())
            .env("MASTER_ADDR", &plan.master_addr)
            .env("MASTER_PORT", plan.master_port.to_string())
            .spawn();
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop_all(&mut children, libc::SIGTERM);
                bail!(
                    Msg,
                    "cannot start worker rank {rank} ({}): {e}",
                    exe.display()
                );
            }
        }
    }
    say(format!(
        "started ranks {}..{} of {world} on this machine (node {} of {})",
        plan.node_rank * plan.nproc,
        (plan.node_rank + 1) * plan.nproc - 1,
        plan.node_rank,
        plan.nnodes
    ));
    supervise(children, say)
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

fn stop_all(children: &mut [(usize, Child)], sig: libc::c_int) {
    for (_, c) in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet (it is
            // still running, so the pid is not reused).
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }
}

fn supervise(mut children: Vec<(usize, Child)>, say: &dyn Fn(String)) -> Result<()> {
    // Failures in the order they were seen: (rank, how, whether it stopped because of another).
    let mut failures: Vec<(usize, String, bool)> = Vec::new();
    let mut failed_at: Option<Instant> = None;
    let mut terminated = false;
    let mut interrupted: Option<i32> = None;
    let mut running: Vec<bool> = vec![true; children.len()];
    while running.iter().any(|&r| r) {
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            interrupted = Some(sig);
            stop_all(&mut children, sig);
        }
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            if !running[i] {
                continue;
            }
            match c.try_wait() {
                Ok(Some(status)) => {
                    running[i] = false;
                    if !status.success() && !terminated {
                        let secondary = status.code() == Some(crate::error::PEER_EXIT_CODE as i32);
                        failures.push((*rank, describe(status), secondary));
                        failed_at.get_or_insert_with(Instant::now);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    running[i] = false;
                    failures.push((*rank, format!("could not be waited for: {e}"), false));
                    failed_at.get_or_insert_with(Instant::now);
                }
            }
        }
        if let (Some(t), None) = (failed_at, interrupted) {
            if !terminated && t.elapsed() > GRACE {
                say("stopping the remaining ranks".into());
                stop_all(&mut children, libc::SIGTERM);
                terminated = true;
            } else if terminated && t.elapsed() > 2 * GRACE {
                stop_all(&mut children, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(sig) = interrupted {
        bail!(
            Msg,
            "interrupted (signal {sig}): every rank was stopped; the run folder keeps its last \
             checkpoint (continue with --resume)"
        );
    }
    // The cause: the first rank that failed on its own (the others stopped because of it).
    let cause = failures.iter().find(|f| !f.2).or_else(|| failures.first());
    if let Some((rank, how, _)) = cause {
        bail!(
            Msg,
            "rank {rank} {how} (its error, if any, is above); every other rank was stopped. The \
             run folder keeps its last checkpoint (continue with --resume)"
        );
    }
    Ok(())
}

/// What identifies the running program for the rendezvous: the version and a checksum of the
/// executable (ranks must run the same build).
pub fn binary_identity() -> Result<String> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Msg(format!("cannot find this program's executable: {e}")))?;
    let bytes = std::fs::read(&exe).map_err(|e| Error::io(&exe, e))?;
    Ok(format!(
        "carp {} crc32 {:08x}",
        env!("CARGO_PKG_VERSION"),
        crc32fast::hash(&bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::env_of as env;

    #[test]
    fn torchrun_and_slurm_variables_name_the_rank() {
        let w = world_from_env(&env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.world, w.local_rank), (3, 8, 1));
        let rv = w.rendezvous(None, None, Duration::from_secs(1)).unwrap();
        assert_eq!((rv.master_addr.as_str(), rv.master_port), ("node7", 1234));
        // Flags win over the environment.
        let rv = w
            .rendezvous(Some("10.0.0.1"), Some(99), Duration::from_secs(1))
            .unwrap();
        assert_eq!((rv.master_addr.as_str(), rv.master_port), ("10.0.0.1", 99));

        let s = world_from_env(&env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "16"),
            ("SLURM_LOCALID", "5"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.world, s.local_rank), (5, 16, 5));
        let e = s
            .rendezvous(None, None, Duration::from_secs(1))
            .unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
        // torchrun's variables win over Slurm's (torchrun inside an allocation).
        let both = world_from_env(&env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((both.rank, both.world), (1, 2));
        // A batch script (no job step) is a single process.
        assert!(
            world_from_env(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]))
                .unwrap()
                .is_none()
        );
        assert!(world_from_env(&env(&[])).unwrap().is_none());
    }

    #[test]
    fn bad_variables_are_clear_errors() {
        for (pairs, want) in [
            (
                vec![("RANK", "x"), ("WORLD_SIZE", "2")],
                "RANK=\"x\" is not a number",
            ),
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2")],
                "rank 2 in a world of 2",
            ),
            (vec![("RANK", "0")], "only one of RANK and WORLD_SIZE"),
        ] {
            let e = world_from_env(&env(&pairs)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_global_batch_must_divide_by_the_world() {
        assert!(check_batch_divides(16, 4).is_ok());
        assert!(check_batch_divides(7, 1).is_ok());
        let e = check_batch_divides(10, 4).unwrap_err().to_string();
        assert!(e.contains("does not divide by the world size 4"), "{e}");
        let plan = LaunchPlan {
            nproc: 2,
            nnodes: 2,
            node_rank: 2,
            master_addr: "h".into(),
            master_port: 1,
        };
        assert!(plan
            .validate(8)
            .unwrap_err()
            .to_string()
            .contains("--node-rank 2"));
    }

    #[test]
    fn workers_get_every_flag_but_the_launchers() {
        let a: Vec<OsString> = [
            "train",
            "--nproc-per-node",
            "2",
            "--steps",
            "3",
            "--nnodes=1",
            "--node-rank",
            "0",
            "--master-port",
            "5",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let w: Vec<String> = worker_args(&a)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(w, ["train", "--steps", "3", "--master-port", "5"]);
    }
}
