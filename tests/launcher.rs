//! Data-parallel runs as processes (the `carp` binary over TCP on this machine, CPU ranks):
//! `--nproc-per-node`, ranks started by environment variables alone, resuming across world
//! sizes, a killed or stopped rank, a rendezvous that times out, mismatched flags, and the bad
//! input that must be refused before any step. The equivalence tests compare the checkpoints
//! with a one-rank run's at the same global batch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 4;
const BATCH: usize = 32;
/// Ranks that take the same steps as one rank agree to the order of float sums: the worst
/// tensor of `tests/data_parallel.rs` differs by 5.5e-7 relative after 3 steps.
const TOL: f64 = 1e-5;

fn carp() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_carp"));
    // A launcher's variables in the test's own environment must not leak into the runs.
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "LOCAL_WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_LOCALID",
    ] {
        c.env_remove(v);
    }
    c
}

/// The tiny preset on the embedded data, small and quick: `extra` flags appended.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--device",
        "cpu",
        "--no-eval",
        "--workers",
        "1",
        "--batch",
        &BATCH.to_string(),
        "--steps",
        &STEPS.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `args` with `--steps n`.
fn with_steps(mut args: Vec<String>, n: usize) -> Vec<String> {
    let at = args.iter().position(|a| a == "--steps").expect("--steps");
    args[at + 1] = n.to_string();
    args
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("start carp")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "carp failed:\n{}", stderr(&o));
    o
}

/// Rank `rank` of `world`, started by the environment alone (as torchrun starts it).
fn rank_process(rank: usize, world: usize, port: u16, args: &[String]) -> Child {
    carp()
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a rank")
}

/// The f32 tensors of a run folder's checkpoint by name.
fn tensors(run_dir: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(run_dir.join("checkpoint.safetensors")).expect("checkpoint");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a valid checkpoint");
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, v)
        })
        .collect()
}

/// The (step, loss) records of metrics.jsonl.
fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "step")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The largest difference between two runs' checkpoint tensors, relative to the largest
/// magnitude of the tensor's group (student, teacher, LARS momentum: as tests/data_parallel.rs
/// measures, since a tensor whose gradient vanishes, such as a bias before batch norm, is all
/// float noise), and the tensor where it is.
fn worst_difference(a: &Path, b: &Path) -> (f64, String) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.keys().collect::<std::collections::BTreeSet<_>>(),
        tb.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let group = |name: &str| name.split('.').next().unwrap_or("").to_string();
    let mut scale: HashMap<String, f64> = HashMap::new();
    for (name, x) in &ta {
        let m = x.iter().fold(1e-12f64, |m, v| m.max(v.abs() as f64));
        let s = scale.entry(group(name)).or_insert(0.0);
        *s = s.max(m);
    }
    let mut worst = (0.0, String::new());
    for (name, x) in &ta {
        let y = &tb[name];
        assert_eq!(x.len(), y.len(), "{name}");
        let d = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max((*p as f64 - *q as f64).abs()))
            / scale[&group(name)];
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

fn assert_same_run(reference: &Path, other: &Path, what: &str) {
    let (d, name) = worst_difference(reference, other);
    assert!(d <= TOL, "{what}: {name} differs by {d:.3e} (relative)");
    let (la, lb) = (losses(reference), losses(other));
    let la: HashMap<u64, f64> = la.into_iter().collect();
    for (step, loss) in lb {
        let want = la[&step];
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{what}: step {step} loss {loss} vs {want}"
        );
    }
    eprintln!("{what}: worst tensor {name} at {d:.2e} relative");
}

/// The one-rank run all the others are compared with.
fn reference(dir: &Path) -> PathBuf {
    let out = dir.join("one-rank");
    ok(run(carp().args(train_args(&out, &[]))));
    out
}

#[test]
fn two_and_four_ranks_as_processes_take_the_one_rank_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let one = reference(tmp.path());

    let two = tmp.path().join("two");
    let port = free_port().to_string();
    let o = ok(run(carp().args(train_args(
        &two,
        &["--nproc-per-node", "2", "--master-port", &port],
    ))));
    assert!(
        stderr(&o).contains("batch 32 (16 per rank on 2 ranks"),
        "{}",
        stderr(&o)
    );
    assert_same_run(&one, &two, "--nproc-per-node 2");
    // Rank 0 alone wrote the run folder; its first record names the world size.
    let first = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert!(first.lines().next().unwrap().contains("\"world_size\":2"));

    // Four processes started by their environment alone, as torchrun or srun start them.
    let four = tmp.path().join("four");
    let port = free_port();
    let args = train_args(&four, &[]);
    let ranks: Vec<Child> = (0..4).map(|r| rank_process(r, 4, port, &args)).collect();
    for (r, c) in ranks.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "rank {r}: {}", stderr(&o));
        if r > 0 {
            assert!(
                stderr(&o).trim().is_empty(),
                "rank {r} spoke: {}",
                stderr(&o)
            );
        }
    }
    assert_same_run(&one, &four, "4 ranks from RANK / WORLD_SIZE");

    // Two processes of an srun job step: Slurm's variables, and MASTER_ADDR as exported.
    let slurm = tmp.path().join("slurm");
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| {
            carp()
                .args(train_args(&slurm, &[]))
                .env("SLURM_PROCID", r.to_string())
                .env("SLURM_STEP_NUM_TASKS", "2")
                .env("SLURM_LOCALID", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, c) in ranks.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "slurm rank {r}: {}", stderr(&o));
    }
    assert_same_run(
        &one,
        &slurm,
        "2 ranks from SLURM_PROCID / SLURM_STEP_NUM_TASKS",
    );

    // Multi-crop: the local views are sliced with their images. Two steps: from the third
    // on, a few channels of the tiny model's layer3 on the 14x14 local views sit at the ReLU
    // boundary and float noise flips them (2e-6 at step 2, 2e-3 at step 4 in that one tensor,
    // as between any two summation orders); tests/data_parallel.rs checks three multi-crop
    // steps on a model without that knife edge. A wrong slice is off by O(1) at step 1.
    let multi = |out: &Path, extra: &[&str]| {
        let mut a = with_steps(train_args(out, extra), 2);
        a.extend(["--local-crops".to_string(), "2".to_string()]);
        a
    };
    let one_mc = tmp.path().join("one-rank-multicrop");
    ok(run(carp().args(multi(&one_mc, &[]))));
    let two_mc = tmp.path().join("two-multicrop");
    let port = free_port().to_string();
    ok(run(carp().args(multi(
        &two_mc,
        &["--nproc-per-node", "2", "--master-port", &port],
    ))));
    assert_same_run(&one_mc, &two_mc, "multi-crop, --nproc-per-node 2");
}

#[test]
fn a_run_resumes_with_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let one = reference(tmp.path());

    // 1 rank for 2 steps, then 2 ranks to the end.
    let up = tmp.path().join("one-then-two");
    ok(run(carp().args(train_args(&up, &["--stop-after", "2"]))));
    let port = free_port().to_string();
    ok(run(carp().args(train_args(
        &up,
        &["--resume", "--nproc-per-node", "2", "--master-port", &port],
    ))));
    assert_same_run(&one, &up, "1 rank then 2");

    // 2 ranks for 2 steps, then 1 rank to the end.
    let down = tmp.path().join("two-then-one");
    let port = free_port().to_string();
    ok(run(carp().args(train_args(
        &down,
        &[
            "--stop-after",
            "2",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
        ],
    ))));
    ok(run(carp().args(train_args(&down, &["--resume"]))));
    assert_same_run(&one, &down, "2 ranks then 1");
}

/// The launcher's children (from /proc), by the RANK in their environment.
fn children_by_rank(launcher: u32) -> HashMap<usize, u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
            .unwrap_or_default();
        let mut found = HashMap::new();
        for pid in list
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            for var in env.split(|&b| b == 0) {
                if let Some(r) = var.strip_prefix(b"RANK=") {
                    if let Ok(r) = String::from_utf8_lossy(r).parse() {
                        found.insert(r, pid);
                    }
                }
            }
        }
        if found.len() == 2 {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the launcher's workers did not appear"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until metrics.jsonl records at least `steps` steps.
fn wait_for_steps(run_dir: &Path, steps: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map(|s| s.matches("\"type\":\"step\"").count())
        .unwrap_or(0)
        < steps
    {
        assert!(
            Instant::now() < deadline,
            "the run did not reach step {steps}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A launcher of 2 ranks on a long run (1000 steps, `extra` flags added) into `out`, its stderr
/// piped, and its workers by rank once they have started.
fn long_launch(out: &Path, extra: &[&str]) -> (Child, HashMap<usize, u32>) {
    let port = free_port().to_string();
    let mut flags = vec!["--nproc-per-node", "2", "--master-port", &port];
    flags.extend_from_slice(extra);
    let launcher = carp()
        .args(with_steps(train_args(out, &flags), 1000))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ranks = children_by_rank(launcher.id());
    (launcher, ranks)
}

/// Whether process `pid` still runs (a missing /proc entry or a zombie: it ended).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started and has not reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn wait_bounded(c: Child, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let pid = c.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        signal(pid, libc::SIGKILL);
    });
    let o = c.wait_with_output().unwrap();
    drop(watchdog);
    (o, t0.elapsed())
}

#[test]
fn a_killed_rank_stops_the_launcher_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (launcher, ranks) = long_launch(&out, &["--checkpoint-every", "1"]);
    wait_for_steps(&out, 3);
    signal(ranks[&1], libc::SIGKILL);
    let (o, took) = wait_bounded(launcher, Duration::from_secs(60));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(err.contains("rank 1 was killed by signal 9"), "{err}");
    assert!(err.contains("rank 1 closed its connection"), "{err}");
    // Rank 0 is gone too, and the checkpoint it left loads.
    assert!(!running(ranks[&0]));
    let t = tensors(&out);
    assert!(!t.is_empty());
}

#[test]
fn a_stopped_rank_is_named_once_the_timeout_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let port = free_port();
    let args = with_steps(train_args(&out, &["--dist-timeout", "3"]), 1000);
    let rank0 = rank_process(0, 2, port, &args);
    let rank1 = rank_process(1, 2, port, &args);
    wait_for_steps(&out, 2);
    // A hung process: it neither computes nor sends heartbeats.
    signal(rank1.id(), libc::SIGSTOP);
    let (o, took) = wait_bounded(rank0, Duration::from_secs(60));
    signal(rank1.id(), libc::SIGKILL);
    let _ = rank1.wait_with_output();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("rank 1 sent nothing"), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn the_rendezvous_names_missing_and_mismatched_ranks_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();

    // Rank 1 never comes.
    let out = tmp.path().join("alone");
    let args = train_args(&out, &["--dist-timeout", "1"]);
    let (o, took) = wait_bounded(
        rank_process(0, 2, free_port(), &args),
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert!(err.contains("rank(s) 1 of 2 never arrived"), "{err}");
    assert!(took < Duration::from_secs(20));
    assert!(!out.exists(), "a refused run wrote its folder");

    // Rank 0 never comes: rank 1 cannot reach it.
    let (o, _) = wait_bounded(
        rank_process(1, 2, free_port(), &args),
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert!(
        err.contains("rank 1") && err.contains("cannot reach rank 0"),
        "{err}"
    );

    // Rank 1 was started with another learning rate.
    let out = tmp.path().join("mismatch");
    let port = free_port();
    let a0 = train_args(&out, &[]);
    let a1 = train_args(&out, &["--lr", "0.5"]);
    let r0 = rank_process(0, 2, port, &a0);
    let r1 = rank_process(1, 2, port, &a1);
    for (r, c) in [(0, r0), (1, r1)] {
        let (o, _) = wait_bounded(c, Duration::from_secs(60));
        let err = stderr(&o);
        assert!(!o.status.success(), "rank {r} ran");
        assert!(
            err.contains("rank 1") && err.contains("`lr`"),
            "rank {r}: {err}"
        );
    }
    assert!(!out.exists(), "a refused run wrote its folder");
}

#[test]
fn bad_launches_are_one_line_errors_that_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(run(carp().args(train_args(&out, &["--stop-after", "1"]))));
    let before: Vec<(String, Vec<u8>)> = ["metrics.jsonl", "config.json", "checkpoint.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(out.join(f)).unwrap()))
        .collect();

    let busy = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let port = free_port().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--resume", "--nproc-per-node", "3", "--master-port", &port],
            "does not divide by the world size 3",
        ),
        (
            vec![
                "--resume",
                "--nproc-per-node",
                "2",
                "--master-port",
                &busy_port,
            ],
            "not free",
        ),
        (
            vec![
                "--resume",
                "--nproc-per-node",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
            ],
            "--node-rank 2",
        ),
        (
            vec!["--resume", "--nproc-per-node", "2", "--dist-timeout", "0"],
            "--dist-timeout",
        ),
        // Without --resume: the folder holds a run, which rank 0 refuses to overwrite.
        (
            vec!["--nproc-per-node", "2", "--master-port", &port],
            "already holds a run",
        ),
    ];
    for (extra, want) in cases {
        let (o, _) = wait_bounded(
            carp()
                .args(train_args(&out, &extra))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            Duration::from_secs(60),
        );
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} ran");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    // A process that already is a rank must not launch more.
    let o = run(carp()
        .args(train_args(&out, &["--resume", "--nproc-per-node", "2"]))
        .env("RANK", "0")
        .env("WORLD_SIZE", "2"));
    assert!(
        stderr(&o).contains("drop --nproc-per-node"),
        "{}",
        stderr(&o)
    );
    for (f, bytes) in before {
        assert_eq!(std::fs::read(out.join(&f)).unwrap(), bytes, "{f} changed");
    }
}

#[test]
fn ctrl_c_reaches_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (launcher, ranks) = long_launch(&out, &[]);
    wait_for_steps(&out, 2);
    // Only the launcher gets it (as from `kill -INT`); it passes it on.
    signal(launcher.id(), libc::SIGINT);
    let (o, took) = wait_bounded(launcher, Duration::from_secs(60));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("interrupted"), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    for pid in ranks.values() {
        assert!(!running(*pid), "worker {pid} still runs");
    }
}

#[test]
fn a_killed_launcher_takes_its_workers_along() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (mut launcher, ranks) = long_launch(&out, &[]);
    wait_for_steps(&out, 2);
    signal(launcher.id(), libc::SIGKILL);
    let _ = launcher.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    for pid in ranks.values() {
        // The workers were the launcher's children: once it is gone they are reaped by init,
        // so a missing /proc entry (or a zombie) means the worker ended.
        while running(*pid) {
            assert!(
                Instant::now() < deadline,
                "worker {pid} outlived its launcher"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
