//! The embedded log under storage faults (issue 22): the disk fills up at random moments, and
//! the journal's last bytes are cut off or corrupted after a `kill -9`. After each fault weir
//! either refuses to start with an error that says what to do, or starts and has lost nothing
//! acknowledged and written no output twice; `weir check-data` finds the directory sound.

use rand::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use weir_tests::{Weir, guest, scaled, skip, wait_until};

/// `weir run` of the `orders` handler over `orders`, group `g`, no admin server.
fn orders_run(module: &Path) -> Vec<&str> {
    vec![
        "run",
        "--module",
        module.to_str().expect("UTF-8 path"),
        "--topic",
        "orders",
        "--group",
        "g",
        "--admin",
        "off",
    ]
}

/// A size-limited tmpfs mounted on the test's data directory, unmounted on drop.
struct Disk {
    at: PathBuf,
    mb: u64,
}

impl Disk {
    /// Mounts `mb` MiB over `at`; `None` (the test skipped) where mounting is not allowed.
    fn mount(at: &Path, mb: u64) -> Option<Disk> {
        std::fs::create_dir_all(at).expect("create the mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip("mounting a tmpfs needs root (CAP_SYS_ADMIN): run the tests as root");
            return None;
        }
        Some(Disk {
            at: at.to_path_buf(),
            mb,
        })
    }

    /// Gives the filesystem `mb` MiB more room.
    fn grow(&mut self, mb: u64) {
        self.mb += mb;
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={}m", self.mb)])
            .arg(&self.at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remounting the tmpfs at {} bigger", self.at.display());
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Every acknowledged order once in `confirmations` (none lost, none twice), each failed
/// produce all or nothing (no half batches), and the directory sound. Returns how many failed
/// produces were kept whole (a write that reached the file before its fsync failed).
fn assert_each_order_once(w: &Weir, acked: &[(u64, u64)], failed: &[(u64, u64)]) -> usize {
    let per_id = w.confirmations_per_id();
    let mut lost = Vec::new();
    for &(start, n) in acked {
        for i in start..start + n {
            if !per_id.contains_key(&format!("m-{i}")) {
                lost.push(i);
            }
        }
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, c)| **c > 1).collect();
    let (mut half, mut kept) = (Vec::new(), 0);
    for &(start, n) in failed {
        let seen = (start..start + n)
            .filter(|i| per_id.contains_key(&format!("m-{i}")))
            .count() as u64;
        if seen == n {
            kept += 1;
        } else if seen > 0 {
            half.push((start, n, seen));
        }
    }
    let out = w.output(&["check-data"]);
    assert!(
        lost.is_empty() && twice.is_empty() && half.is_empty() && out.status.success(),
        "lost {} acknowledged orders (first {:?}), {} written twice (first {:?}), failed \
         produces partly kept (start, n, kept): {half:?}; check-data: {}",
        lost.len(),
        lost.first(),
        twice.len(),
        twice.first(),
        String::from_utf8_lossy(&out.stdout)
    );
    kept
}

/// The case: `weir run` with the `orders` handler while producers fill the disk, again
/// and again, each time at a moment the random batch sizes decide. The run stops with a storage
/// error each time; the disk is grown and the run started again. At the end, after a drain,
/// every acknowledged order has exactly one confirmation and no failed produce left any order.
#[test]
fn disk_full_at_random_moments_loses_and_doubles_nothing() {
    disk_full(scaled(3, 3), false);
}

/// The same with `--dedupe header` (the dedupe marks live with the log and fill the disk too),
/// and a producer that sends each failed produce again once there is room: with dedupe, every
/// order is confirmed exactly once whether or not the failed chunk was kept.
#[test]
fn disk_full_with_dedupe_and_retried_produces_confirms_each_order_once() {
    disk_full(scaled(2, 2), true);
}

fn disk_full(fills: u64, dedupe: bool) {
    let w = Weir::new();
    let Some(mut disk) = Disk::mount(&w.data_dir(), 12) else {
        return;
    };
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 2);
    let module = guest("orders");
    let mut rng = rand::rng();
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    let mut next = 0u64;
    // A failed produce, to send again (with dedupe) once the disk has grown.
    let mut retry: Option<(u64, u64)> = None;
    // Sends a failed produce again; false when the disk is full again (it stays to retry).
    let send_again = |w: &Weir, (start, n): (u64, u64), acked: &mut Vec<(u64, u64)>| {
        let out = w.output(&[
            "produce",
            "orders",
            "--count",
            &n.to_string(),
            "--start",
            &start.to_string(),
        ]);
        if out.status.success() {
            acked.push((start, n));
        }
        out.status.success()
    };
    let mut run_args = orders_run(&module);
    if dedupe {
        run_args.extend_from_slice(&["--dedupe", "header"]);
    }
    for fill in 0..fills {
        // Started again once the disk has grown; if it has not grown enough for the run to
        // open the log (fjall writes as it recovers), the run must say so and stop: the disk
        // grows more.
        let mut attempt = 0;
        let (mut run, log) = loop {
            attempt += 1;
            let log = w.path(&format!("run-{fill}-{attempt}.log"));
            // The last run has exited: a socket file it left is not a run serving.
            let _ = std::fs::remove_file(w.data_dir().join("weir.sock"));
            let mut run = w.spawn_logged(&run_args, &log);
            wait_until(
                "the run serves the log, or stops",
                Duration::from_secs(60),
                || w.data_dir().join("weir.sock").exists() || !run.is_running(),
            );
            if run.is_running() {
                break (run, log);
            }
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                said.contains("storage error") && !said.contains("panicked") && attempt < 5,
                "fill {fill}: the run did not start: {said}"
            );
            eprintln!("fill {fill}: the run refused to start on a full disk (attempt {attempt})");
            disk.grow(8);
        };
        // A producer sends what failed again first; if the disk is full again (the restart's
        // own writes took the room), that is this fill's failure.
        let full_again = match retry.take() {
            Some(r) if !send_again(&w, r, &mut acked) => {
                retry = Some(r);
                true
            }
            _ => false,
        };
        // Produce until a produce fails: the disk is full.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            // Nothing to produce when the retry found the disk full again.
            if full_again {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fill {fill}: the disk never filled"
            );
            let n = rng.random_range(200..3_000u64);
            let size = rng.random_range(100..800u32);
            let out = w.output(&[
                "produce",
                "orders",
                "--count",
                &n.to_string(),
                "--start",
                &next.to_string(),
                "--size",
                &size.to_string(),
            ]);
            if out.status.success() {
                acked.push((next, n));
                next += n;
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    err.contains("No space left") || err.contains("storage"),
                    "fill {fill}: produce failed for another reason: {err}"
                );
                if dedupe {
                    retry = Some((next, n));
                } else {
                    failed.push((next, n));
                }
                next += n;
                break;
            }
        }
        // The run stops on its own, with the storage error and a non-zero exit.
        wait_until("the run stops", Duration::from_secs(120), || {
            !run.is_running()
        });
        let out = run.wait();
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !out.status.success() && said.contains("storage error"),
            "fill {fill}: the run ended with {} and said:\n{said}",
            out.status
        );
        assert!(!said.contains("panicked"), "fill {fill}: {said}");
        disk.grow(rng.random_range(4..10));
    }
    disk.grow(64);
    if let Some(r) = retry.take() {
        assert!(
            send_again(&w, r, &mut acked),
            "a retried produce failed with room"
        );
    }
    w.drain(
        &module,
        "orders",
        "g",
        if dedupe { &["--dedupe", "header"] } else { &[] },
    );
    // A full disk fails the journal write itself: nothing of a failed produce is kept.
    assert_eq!(assert_each_order_once(&w, &acked, &failed), 0);
    eprintln!(
        "{fills} fills: {} produces acknowledged ({} orders), {} failed",
        acked.len(),
        acked.iter().map(|(_, n)| n).sum::<u64>(),
        failed.len()
    );
}

/// What a torn write leaves: a run is killed mid-work, then the journal it was writing loses
/// its last bytes (cut at a random offset past what was durable before the run began), or
/// has a byte flipped there. The orders were all produced (and fsynced) before; only the run's
/// commits (outputs with their offsets, one batch each) are in the damaged part. Restarted,
/// weir either refuses with an error that names the directory, or drains and every order has
/// exactly one confirmation: a commit is lost whole or kept whole.
#[test]
fn a_torn_journal_tail_loses_commits_whole() {
    let rounds = scaled(4, 4);
    let mut rng = rand::rng();
    for round in 0..rounds {
        let w = Weir::new();
        let n = 6_000u64;
        w.create_topic("orders", 2);
        w.create_topic("confirmations", 2);
        w.ok(&["produce", "orders", "--count", &n.to_string()]);
        let journal = newest_journal(&w.data_dir());
        let durable = std::fs::metadata(&journal).expect("journal").len();
        let module = guest("orders");
        let mut run = w.spawn(&[
            "run",
            "--module",
            module.to_str().unwrap(),
            "--topic",
            "orders",
            "--group",
            "g",
            "--batch-size",
            "16",
            "--admin",
            "off",
        ]);
        let at = rng.random_range(n / 5..n * 4 / 5);
        wait_until(
            "the run has committed some",
            Duration::from_secs(120),
            || w.committed("orders", "g") >= at,
        );
        run.kill();
        let jnl = newest_journal(&w.data_dir());
        let len = std::fs::metadata(&jnl).expect("journal").len();
        // Only what the run wrote: in the journal the produce wrote, past its length.
        let from = if jnl == journal { durable } else { 0 };
        let cut = rng.random_range(from..len.max(from + 1));
        let flip = rng.random_bool(0.5);
        if flip {
            let mut bytes = std::fs::read(&jnl).unwrap();
            if (cut as usize) < bytes.len() {
                bytes[cut as usize] ^= 0x5a;
            }
            std::fs::write(&jnl, bytes).unwrap();
        } else {
            let f = std::fs::OpenOptions::new().write(true).open(&jnl).unwrap();
            f.set_len(cut).unwrap();
        }
        let how = if flip { "a byte flipped" } else { "cut" };
        let out = w.output(&["check-data"]);
        // A cut tail (a short file) is a torn write fjall's recovery drops; a damaged byte
        // inside the journal (even in its last batch) makes fjall refuse to open.
        assert!(
            flip || out.status.success(),
            "round {round}: cut at {cut} of {len}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            // Refused: it must say what is wrong and where.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&w.data_dir().display().to_string()),
                "round {round} ({how} at {cut} of {len}): {err}"
            );
            eprintln!("round {round}: {how} at {cut} of {len}: refused: {err}");
            continue;
        }
        w.drain(&module, "orders", "g", &[]);
        assert_each_order_once(&w, &[(0, n)], &[]);
        eprintln!("round {round}: {how} at {cut} of {len} (run's part from {from}): sound");
    }
}

/// The journal file written last.
fn newest_journal(data: &Path) -> PathBuf {
    let dir = data.join("log");
    std::fs::read_dir(&dir)
        .expect("the log's directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .max_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .expect("a journal file")
}

/// The failfs shim (tests/faults/failfs.c), built once per test process with the machine's cc.
fn failfs() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("faults/failfs.c");
            let out = std::env::temp_dir().join(format!("weir-failfs-{}.so", std::process::id()));
            let built = Command::new("cc")
                .args(["-shared", "-fPIC", "-O1", "-o"])
                .arg(&out)
                .arg(&src)
                .arg("-ldl")
                .output()
                .expect("run cc (gcc) to build the failfs shim");
            assert!(
                built.status.success(),
                "building {}: {}",
                src.display(),
                String::from_utf8_lossy(&built.stderr)
            );
            out
        })
        .clone()
}

/// Writes and fsyncs that fail below weir (the failfs shim in the run's process), at random
/// moments while producers write through the run: the run stops with a storage error each
/// time, and started again (without the fault) it has lost no acknowledged order and written
/// no confirmation twice. Rounds alternate failing fsyncs and failing writes.
#[test]
fn failed_fsyncs_and_writes_lose_and_double_nothing() {
    let rounds = scaled(4, 4);
    let shim = failfs();
    let w = Weir::new();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 2);
    let module = guest("orders");
    let trigger = w.path("fail-now");
    let mut rng = rand::rng();
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    let mut next = 0u64;
    for round in 0..rounds {
        let ops = if round % 2 == 0 { "fsync" } else { "write" };
        let log = w.path(&format!("run-{round}.log"));
        let _ = std::fs::remove_file(w.data_dir().join("weir.sock"));
        let child = w
            .cmd(&orders_run(&module))
            .env("LD_PRELOAD", &shim)
            .env("WEIR_FAILFS_TRIGGER", &trigger)
            .env("WEIR_FAILFS_OPS", ops)
            .env("WEIR_FAILFS_UNDER", w.data_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("run log"))
            .spawn()
            .expect("start weir run");
        let mut run = weir_tests::Running::from(child);
        wait_until("the run serves the log", Duration::from_secs(60), || {
            w.data_dir().join("weir.sock").exists()
        });
        // Some produces succeed, then the disk starts failing at a random point.
        let before = rng.random_range(1..6);
        for k in 0.. {
            if k == before {
                std::fs::write(&trigger, b"").expect("arm the fault");
            }
            let n = rng.random_range(100..2_000u64);
            let out = w.output(&[
                "produce",
                "orders",
                "--count",
                &n.to_string(),
                "--start",
                &next.to_string(),
            ]);
            if out.status.success() {
                acked.push((next, n));
            } else {
                failed.push((next, n));
            }
            next += n;
            if !out.status.success() || !run.is_running() {
                break;
            }
            assert!(
                k < before + 20,
                "round {round}: failing {ops} did not stop the run"
            );
        }
        wait_until("the run stops", Duration::from_secs(120), || {
            !run.is_running()
        });
        let out = run.wait();
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !out.status.success() && said.contains("storage error") && !said.contains("panicked"),
            "round {round} (failing {ops}): the run ended with {} and said:\n{said}",
            out.status
        );
        std::fs::remove_file(&trigger).expect("disarm the fault");
    }
    w.drain(&module, "orders", "g", &[]);
    let kept = assert_each_order_once(&w, &acked, &failed);
    eprintln!(
        "{rounds} rounds: {} produces acknowledged, {} failed ({kept} of them kept whole: \
         written before the fsync failed)",
        acked.len(),
        failed.len()
    );
}

/// `kill -9` at random moments while the log rotates its journal and flushes memtables to
/// tables: each run gets 30,000 more orders of 400 bytes through its socket before it is killed,
/// so more than fjall's 64 MiB memtable of records goes through while runs are alive. Each
/// restart goes on from what was committed; at the end every order has exactly one confirmation
/// and the directory is sound. The test checks that the journal rotated and that compactions
/// merged tables away while runs wrote (fjall compacts in the background: the kills land among
/// them).
#[test]
fn kill_9_through_journal_rotation_and_flushes_loses_and_doubles_nothing() {
    let kills = scaled(6, 6);
    let per_run = 30_000u64;
    let w = Weir::new();
    w.create_topic("orders", 2);
    w.create_topic("confirmations", 2);
    w.ok(&["produce", "orders", "--count", "10000", "--size", "400"]);
    let mut produced = 10_000u64;
    let module = guest("orders");
    let mut rng = rand::rng();
    let journals = |w: &Weir| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(w.data_dir().join("log"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|f| f.ends_with(".jnl"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let initial = journals(&w);
    let mut seen = initial.clone();
    // Table files per keyspace, sampled while runs write: one that is gone later while its
    // keyspace is still there was merged away by a compaction.
    let mut tables: std::collections::BTreeSet<PathBuf> = Default::default();
    let sample = |w: &Weir, into: &mut std::collections::BTreeSet<PathBuf>| {
        let Ok(spaces) = std::fs::read_dir(w.data_dir().join("log").join("keyspaces")) else {
            return;
        };
        for ks in spaces.flatten() {
            if let Ok(files) = std::fs::read_dir(ks.path().join("tables")) {
                into.extend(files.flatten().map(|f| f.path()));
            }
        }
    };
    for _ in 0..kills {
        let _ = std::fs::remove_file(w.data_dir().join("weir.sock"));
        let mut run = w.spawn(&orders_run(&module));
        wait_until("the run serves the log", Duration::from_secs(60), || {
            w.data_dir().join("weir.sock").exists()
        });
        w.ok(&[
            "produce",
            "orders",
            "--count",
            &per_run.to_string(),
            "--start",
            &produced.to_string(),
            "--size",
            "400",
        ]);
        produced += per_run;
        let from = w.committed("orders", "g");
        let at = (from + rng.random_range(1..(produced - from).max(2))).min(produced);
        wait_until(
            "the run has committed more",
            Duration::from_secs(300),
            || {
                sample(&w, &mut tables);
                w.committed("orders", "g") >= at
            },
        );
        run.kill();
        seen.extend(journals(&w));
    }
    w.drain(&module, "orders", "g", &[]);
    seen.extend(journals(&w));
    assert_each_order_once(&w, &[(0, produced)], &[]);
    assert!(
        seen.len() > initial.len(),
        "the journal never rotated while runs wrote ({initial:?} after producing, {seen:?} \
         after): the test did not reach a memtable flush"
    );
    let compacted = tables
        .iter()
        .filter(|t| !t.exists() && t.parent().is_some_and(Path::exists))
        .count();
    assert!(
        compacted > 0,
        "no table was merged away while runs wrote ({} tables seen): no compaction ran",
        tables.len()
    );
    eprintln!(
        "{kills} kills, {produced} orders, journals: {initial:?} before the runs, {seen:?} seen \
         in all; {} table files seen, {compacted} merged away by compactions",
        tables.len()
    );
}
