use super::*;
use crate::source::Output;

/// A tmpfs of its own, unmounted when dropped; `None` where this process may not mount.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?
            .success();
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Issue 19, finding 11: an append whose write failed (the disk full) still moved the
/// partition's end offset in memory: the offsets it took stayed a hole that readers and
/// `--drain` waited on. The end now moves only once the write batch is committed.
#[test]
fn a_failed_append_leaves_no_hole_in_the_offsets() {
    let Some(disk) = SmallDisk::mount("8m") else {
        // CI runs as root, where mounting works; elsewhere say so rather than pass quietly.
        assert!(std::env::var_os("CI").is_none(), "cannot mount a tmpfs");
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    };
    let log = EmbeddedLog::open(&disk.0.path().join("data")).unwrap();
    log.create_topic("t", 1).unwrap();
    log.append("t", vec![rec(None, "first")]).unwrap();
    // Fill the disk, then append what does not fit (text that does not compress).
    let filler = disk.0.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 16 << 20]);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: String = (0..1_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect();
    let failed = (0..4)
        .filter(|_| log.append("t", vec![rec(None, &noise)]).is_err())
        .count();
    assert!(failed > 0, "no append failed on a full disk");
    // fjall refuses every write after a failed one (it is poisoned until reopened); what
    // readers see must still end where the stored records end.
    let stored = log.read("t", 0, 0, 100).unwrap().len() as u64;
    let end = log.end_offset("t", 0).unwrap();
    assert_eq!(
        end, stored,
        "after {failed} failed appends the end offset is {end}, with {stored} records stored"
    );
    drop(log);
    std::fs::remove_file(&filler).unwrap();
}

fn rec(key: Option<&str>, payload: &str) -> Record {
    Record {
        key: key.map(|k| k.as_bytes().to_vec()),
        payload: payload.as_bytes().to_vec(),
        ..Record::default()
    }
}

#[test]
fn append_read_commit_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path()).unwrap();
        log.create_topic("in", 2).unwrap();
        log.create_topic("out", 1).unwrap();
        let placed = log
            .append("in", vec![rec(None, "a"), rec(None, "b"), rec(None, "c")])
            .unwrap();
        assert_eq!(placed, vec![(0, 0), (1, 0), (0, 1)]);
        let got = log.read("in", 0, 0, 10).unwrap();
        assert_eq!(
            got.iter()
                .map(|d| d.record.payload.clone())
                .collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"c".to_vec()]
        );
        assert!(got[0].record.timestamp_ms.is_some());
        log.commit_batch(
            "g",
            Commit {
                offsets: vec![(Arc::from("in"), 0, 2)],
                outputs: vec![Output {
                    topic: "out".into(),
                    record: rec(Some("k"), "A"),
                }],
                replayed: vec![("in".into(), 1, 0)],
                dedupe_done: vec![(b"id-1".to_vec(), 5_000), (b"id-2".to_vec(), 1_000)],
                ..Default::default()
            },
        )
        .unwrap();
    }
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert_eq!(log.committed_offset("g", "in", 0).unwrap(), 2);
    assert_eq!(log.committed_offset("g", "in", 1).unwrap(), 0);
    assert_eq!(
        log.replayed("in", 1)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![0]
    );
    assert!(log.replayed("in", 0).unwrap().is_empty());
    // Done marks are per group and expire; eviction removes only expired ones.
    assert!(log.dedupe_done("g", b"id-1", 2_000).unwrap());
    assert!(
        !log.dedupe_done("g", b"id-2", 2_000).unwrap(),
        "expired at 1000"
    );
    assert!(!log.dedupe_done("other", b"id-1", 2_000).unwrap());
    assert_eq!(log.evict_dedupe(2_000, 100).unwrap(), 1);
    assert_eq!(log.evict_dedupe(2_000, 100).unwrap(), 0);
    assert!(
        log.dedupe_done("g", b"id-1", 2_000).unwrap(),
        "unexpired marks stay"
    );
    assert_eq!(log.end_offset("in", 0).unwrap(), 2);
    assert_eq!(log.read("out", 0, 0, 10).unwrap()[0].record.payload, b"A");
    let stats = log.stats(Some("in")).unwrap();
    assert_eq!(stats[0].partitions[0].groups[0].lag, 0);
    assert_eq!(stats[0].partitions[1].groups.len(), 0);
    // Appends after reopen continue the offsets (of whichever partition round robin picks).
    let (p, o) = log.append("in", vec![rec(None, "d")]).unwrap()[0];
    assert_eq!(o, if p == 0 { 2 } else { 1 });
}

#[test]
fn keys_pick_a_stable_partition() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    log.create_topic("t", 4).unwrap();
    let placed = log
        .append("t", vec![rec(Some("x"), "1"), rec(Some("x"), "2")])
        .unwrap();
    assert_eq!(placed[0].0, placed[1].0);
    assert_eq!(placed[0].0, partition_for_key(b"x", 4));
}

#[test]
fn bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert!(matches!(
        log.append("nope", vec![]),
        Err(SourceError::UnknownTopic(_))
    ));
    assert!(matches!(
        log.create_topic("a/b", 1),
        Err(SourceError::InvalidTopic { .. })
    ));
    assert!(matches!(
        log.create_topic("a", 0),
        Err(SourceError::Invalid(_))
    ));
    log.create_topic("a", 1).unwrap();
    assert!(matches!(
        log.create_topic("a", 1),
        Err(SourceError::TopicExists(_))
    ));
    assert!(matches!(
        log.read("a", 3, 0, 1),
        Err(SourceError::UnknownPartition { .. })
    ));
    // Outputs to a missing topic fail the whole commit, offsets included.
    let err = log
        .commit_batch(
            "g",
            Commit {
                offsets: vec![(Arc::from("a"), 0, 1)],
                outputs: vec![Output {
                    topic: "missing".into(),
                    record: rec(None, "x"),
                }],
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, SourceError::UnknownTopic(_)));
    assert_eq!(log.committed_offset("g", "a", 0).unwrap(), 0);
}

#[test]
fn marks_kept_in_meta_by_older_versions_move_to_their_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path()).unwrap();
        // What an older weir wrote: the mark and its expiry index in `meta`.
        let mark = codec::dedupe_key("g", b"id-1");
        let mut batch = log.db.batch();
        batch.insert(&log.meta, codec::expiry_key(5_000, &mark), []);
        batch.insert(&log.meta, mark, 5_000u64.to_be_bytes());
        batch.commit().unwrap();
        assert!(!log.dedupe_done("g", b"id-1", 1_000).unwrap());
    }
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert!(log.dedupe_done("g", b"id-1", 1_000).unwrap());
    assert_eq!(
        log.meta.prefix(b"d/").count() + log.meta.prefix(b"x/").count(),
        0
    );
    assert_eq!(
        log.evict_dedupe(6_000, 10).unwrap(),
        1,
        "the index moved too"
    );
    assert!(!log.dedupe_done("g", b"id-1", 1_000).unwrap());
}

#[test]
fn marks_in_the_old_dedupe_keyspace_move_to_marks() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path()).unwrap();
        // What the previous version wrote: a keyspace `dedupe` with default options.
        let old = log
            .db
            .keyspace("dedupe", KeyspaceCreateOptions::default)
            .unwrap();
        let mark = codec::dedupe_key("g", b"id-2");
        let mut batch = log.db.batch();
        batch.insert(&old, codec::expiry_key(5_000, &mark), []);
        batch.insert(&old, mark, 5_000u64.to_be_bytes());
        batch.commit().unwrap();
    }
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert!(log.dedupe_done("g", b"id-2", 1_000).unwrap());
    assert!(
        !log.db.keyspace_exists("dedupe"),
        "the old keyspace is gone"
    );
    assert_eq!(
        log.evict_dedupe(6_000, 10).unwrap(),
        1,
        "the index moved too"
    );
    drop(log);
    // Reopening finds nothing more to move and keeps what moved.
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert!(!log.dedupe_done("g", b"id-2", 1_000).unwrap());
}

#[test]
fn a_second_open_reports_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let _log = EmbeddedLog::open(dir.path()).unwrap();
    assert!(matches!(
        EmbeddedLog::open(dir.path()),
        Err(SourceError::Locked { .. })
    ));
}

#[test]
fn a_foreign_directory_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    assert!(matches!(
        EmbeddedLog::open(dir.path()),
        Err(SourceError::Corrupt { .. })
    ));
    assert!(!dir.path().join("log").exists());
}

/// Group commit on a real log: eight writers appending at once each get their records back,
/// dense and durable across a reopen, and never more fsyncs than appends (fewer whenever
/// appends overlap; how many fewer depends on the disk, so it is printed, not asserted).
#[test]
fn concurrent_appends_share_fsyncs_and_all_stay() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path()).unwrap());
    log.create_topic("t", 1).unwrap();
    let before = log.syncs();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    log.append("t", vec![rec(None, &format!("{w}-{i}"))])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let syncs = log.syncs() - before;
    eprintln!("200 appends by 8 writers took {syncs} fsyncs");
    assert!((1..=200).contains(&syncs), "{syncs} fsyncs for 200 appends");
    drop(log);
    let log = EmbeddedLog::open(dir.path()).unwrap();
    let got = log.read("t", 0, 0, 1000).unwrap();
    assert_eq!(got.len(), 200);
    assert!(got.iter().enumerate().all(|(i, d)| d.offset == i as u64));
    let mut payloads: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8(d.record.payload.clone()).unwrap())
        .collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), 200);
}
