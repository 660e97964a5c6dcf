//! Segments, retention and the lifecycle verbs on a real log in a temporary directory.

use super::*;
use weir_core::retention::{Policy, SeekTo};

fn rec(payload: &str) -> Record {
    Record {
        payload: payload.as_bytes().to_vec(),
        ..Record::default()
    }
}

fn at(ts: u64) -> Record {
    Record {
        payload: b"x".to_vec(),
        timestamp_ms: Some(ts),
        ..Record::default()
    }
}

fn small(max_bytes: Option<u64>, policy: Policy) -> Retention {
    Retention {
        max_bytes,
        segment_bytes: Some(10_000),
        policy,
        ..Retention::FOREVER
    }
}

/// Every offset of the partition from `from`, read as a consumer does (in pages).
fn offsets(log: &EmbeddedLog, topic: &str, p: u32, from: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let page = log.read(topic, p, at, 37).unwrap();
        let Some(last) = page.last() else { break };
        at = last.offset + 1;
        out.extend(page.iter().map(|d| d.offset));
    }
    out
}

fn fill(log: &EmbeddedLog, topic: &str, n: usize) {
    let body = "y".repeat(100);
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        log.append(topic, chunk.iter().map(|_| rec(&body)).collect())
            .unwrap();
    }
}

#[test]
fn segments_roll_reads_cross_them_and_retention_drops_whole_ones() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    log.create_topic_retained("t", 2, small(Some(40_000), Policy::Limits))
        .unwrap();
    fill(&log, "t", 1000);
    let t = log.topic("t").unwrap();
    let before = t.segments.read().unwrap().len();
    assert!(
        before > 5,
        "100 KB in 10 KB segments made {before} segments"
    );
    for p in 0..2 {
        let all = offsets(&log, "t", p, 0);
        assert_eq!(
            all,
            (0..500).collect::<Vec<_>>(),
            "partition {p} across segments"
        );
    }
    log.commit_batch(
        "slow",
        Commit {
            offsets: vec![(Arc::from("t"), 0, 3)],
            ..Default::default()
        },
    )
    .unwrap();
    let dropped = log.retain(now_ms()).unwrap();
    assert!(dropped > 0, "100 KB over a 40 KB bound dropped nothing");
    let starts: Vec<u64> = (0..2).map(|p| t.start(p)).collect();
    assert!(starts.iter().all(|&s| s > 0), "{starts:?}");
    // The deleted segments' files are closed, not only unlinked: their space is free.
    let open_deleted = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| {
            target.starts_with(dir.path()) && target.to_string_lossy().ends_with("(deleted)")
        })
        .count();
    assert_eq!(open_deleted, 0, "files of deleted segments are still open");
    let kept: u64 = {
        let segs = t.segments.read().unwrap();
        segs.iter()
            .enumerate()
            .map(|(i, s)| s.bytes(i + 1 < segs.len()))
            .sum()
    };
    assert!(kept <= 40_000, "{kept} bytes kept over a 40,000 byte bound");
    // A read from below the start begins at the oldest kept record, densely to the end.
    for p in 0..2 {
        let from_zero = offsets(&log, "t", p, 0);
        assert_eq!(from_zero, (starts[p as usize]..500).collect::<Vec<_>>());
    }
    // A group that never committed starts at the oldest kept record; one that did keeps its
    // offset (its consumer finds the gap and counts it).
    assert_eq!(log.committed_offset("new", "t", 1).unwrap(), starts[1]);
    assert_eq!(log.committed_offset("slow", "t", 0).unwrap(), 3);
    let r = log.check().unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
    // What is kept survives a restart, and appends go on from the ends.
    drop(t);
    drop(log);
    let log = EmbeddedLog::open(dir.path()).unwrap();
    let t = log.topic("t").unwrap();
    assert_eq!((0..2).map(|p| t.start(p)).collect::<Vec<_>>(), starts);
    assert_eq!(log.end_offset("t", 0).unwrap(), 500);
    log.append("t", vec![rec("after")]).unwrap();
    assert_eq!(
        offsets(&log, "t", 0, 0).len() + offsets(&log, "t", 1, 0).len(),
        1001 - starts.iter().sum::<u64>() as usize
    );
    assert!(log.check().unwrap().problems.is_empty());
}

#[test]
fn interest_keeps_what_a_group_has_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    log.create_topic_retained("t", 1, small(Some(1), Policy::Interest))
        .unwrap();
    fill(&log, "t", 500);
    assert_eq!(log.retain(now_ms()).unwrap(), 0, "no group yet: all kept");
    let commit = |g: &str, o: u64| {
        log.commit_batch(
            g,
            Commit {
                offsets: vec![(Arc::from("t"), 0, o)],
                ..Default::default()
            },
        )
        .unwrap()
    };
    commit("fast", 500);
    commit("slow", 0);
    assert_eq!(log.retain(now_ms()).unwrap(), 0, "slow has read nothing");
    commit("slow", 250);
    assert!(log.retain(now_ms()).unwrap() > 0);
    let start = log.topic("t").unwrap().start(0);
    assert!(
        start > 0 && start <= 250,
        "start {start} passed what slow committed"
    );
    assert_eq!(offsets(&log, "t", 0, 250).first(), Some(&250));
}

#[test]
fn a_commit_counts_skipped_records_once_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    log.create_topic("t", 1).unwrap();
    fill(&log, "t", 10);
    for (offset, skipped) in [(4, 3), (10, 2)] {
        log.commit_batch(
            "g",
            Commit {
                offsets: vec![(Arc::from("t"), 0, offset)],
                skipped: vec![(Arc::from("t"), 0, skipped)],
                ..Default::default()
            },
        )
        .unwrap();
    }
    let g = log.groups(Some("g")).unwrap();
    assert_eq!(g[0].partitions[0].skipped_by_retention, Some(5));
    assert_eq!(log.skipped_by_retention(), 5);
}

#[test]
fn seek_by_time_offset_and_ends_then_delete() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    log.create_topic("t", 1).unwrap();
    log.append("t", (0..10).map(|i| at(1_000 + i)).collect())
        .unwrap();
    log.append("t", (0..10).map(|i| at(5_000 + i)).collect())
        .unwrap();
    let seek = |to| log.seek_group("g", "t", None, to).unwrap()[0].to;
    assert_eq!(seek(SeekTo::Time(5_000)), 10);
    assert_eq!(seek(SeekTo::Time(1_005)), 5);
    assert_eq!(seek(SeekTo::Time(0)), 0);
    assert_eq!(seek(SeekTo::Time(9_999)), 20);
    assert_eq!(seek(SeekTo::Latest), 20);
    assert_eq!(seek(SeekTo::Offset(7)), 7);
    assert_eq!(seek(SeekTo::Offset(99)), 20, "kept within the partition");
    assert_eq!(seek(SeekTo::Earliest), 0);
    assert_eq!(log.committed_offset("g", "t", 0).unwrap(), 0);
    assert!(matches!(
        log.seek_group("g", "t", Some(3), SeekTo::Latest),
        Err(SourceError::UnknownPartition { .. })
    ));
    log.delete_group("g").unwrap();
    assert!(log.groups(None).unwrap().is_empty());
    assert!(log.delete_group("g").is_err(), "a group that is not there");
    // A deleted topic takes its records; one made again under its name starts empty.
    log.commit_batch(
        "h",
        Commit {
            offsets: vec![(Arc::from("t"), 0, 20)],
            ..Default::default()
        },
    )
    .unwrap();
    log.delete_topic("t").unwrap();
    assert!(matches!(
        log.read("t", 0, 0, 1),
        Err(SourceError::UnknownTopic(_))
    ));
    log.create_topic("t", 1).unwrap();
    assert!(log.read("t", 0, 0, 100).unwrap().is_empty());
    assert_eq!(
        log.committed_offset("h", "t", 0).unwrap(),
        0,
        "offsets went too"
    );
    drop(log);
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert!(log.read("t", 0, 0, 100).unwrap().is_empty());
    assert!(log.check().unwrap().problems.is_empty());
}

/// A directory made before segments: every topic's records in one keyspace, `records`, and
/// topic definitions without a retention. It opens with that keyspace as each topic's segment
/// 0, keeps everything, and lets it go once retention drops it from every topic.
#[test]
fn a_directory_from_before_segments_opens_and_lets_go_of_its_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::builder(dir.path().join("log")).open().unwrap();
        let records = db
            .keyspace("records", KeyspaceCreateOptions::default)
            .unwrap();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
        for t in ["a", "b"] {
            meta.insert(codec::topic_key(t), r#"{"partitions":1,"created_ms":1}"#)
                .unwrap();
            for o in 0..5u64 {
                let mut buf = Vec::new();
                codec::encode(&rec(&format!("{t}{o}")), &mut buf);
                records.insert(codec::record_key(t, 0, o), buf).unwrap();
            }
        }
        db.persist(PersistMode::SyncAll).unwrap();
    }
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert_eq!(offsets(&log, "a", 0, 0), (0..5).collect::<Vec<_>>());
    assert_eq!(log.end_offset("b", 0).unwrap(), 5);
    assert_eq!(log.usage(Some("a")).unwrap()[0].retention, "forever");
    assert!(log.check().unwrap().problems.is_empty());
    for t in ["a", "b"] {
        log.set_retention(t, |_| small(Some(1), Policy::Limits))
            .unwrap();
        // Enough to seal segment 0 (its 5 records are counted from its size on disk, so a
        // segment holding them is full) and start another.
        fill(&log, t, 300);
    }
    log.retain(now_ms()).unwrap();
    assert!(log.topic("a").unwrap().start(0) >= 5);
    drop(log);
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert!(
        !log.db.keyspace_exists("records"),
        "segment 0 is gone from every topic, its keyspace should be too"
    );
    assert!(log.check().unwrap().problems.is_empty());
}

/// Segments come and go without keyspaces coming and going: a deleted segment's keyspace is
/// emptied and reused, so fjall's own record of keyspaces (which grew without bound under
/// creates and deletes) stops changing once the pool is warm; what is kept reads back whole.
#[test]
fn deleted_segments_keyspaces_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    log.create_topic_retained("t", 1, small(Some(30_000), Policy::Limits))
        .unwrap();
    // Every keyspace name seen, after each round.
    let mut seen = std::collections::BTreeSet::new();
    let mut counts = Vec::new();
    for _ in 0..30 {
        fill(&log, "t", 200);
        log.retain(now_ms()).unwrap();
        seen.extend(log.db.list_keyspace_names().iter().map(|n| n.to_string()));
        counts.push(seen.len());
    }
    assert!(
        log.segments_dropped() > 40,
        "{} dropped",
        log.segments_dropped()
    );
    assert!(
        counts[29] <= counts[10] + 1,
        "new keyspaces kept being made: {counts:?}"
    );
    let start = log.topic("t").unwrap().start(0);
    assert_eq!(offsets(&log, "t", 0, 0), (start..6000).collect::<Vec<_>>());
    assert!(log.check().unwrap().problems.is_empty());
    drop(log);
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert_eq!(offsets(&log, "t", 0, 0), (start..6000).collect::<Vec<_>>());
    assert!(log.check().unwrap().problems.is_empty());
}

/// A topic deleted while retention trims it and another topic grows: each deleted segment's
/// keyspace goes back to the pool once. Before, retention and `delete_topic` could both give
/// back the oldest segment's keyspace (the pool then held it twice, and the second emptying
/// could wipe a new segment that had taken it). Afterwards the other topic has every record,
/// and `check` finds nothing wrong.
#[test]
fn deleting_a_topic_while_retention_trims_it_gives_each_keyspace_back_once() {
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path()).unwrap());
        log.create_topic_retained("doomed", 1, small(Some(20_000), Policy::Limits))
            .unwrap();
        log.create_topic_retained("kept", 1, small(None, Policy::Limits))
            .unwrap();
        fill(&log, "doomed", 600);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let trim = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    log.retain(now_ms()).unwrap();
                }
            })
        };
        let grow = {
            let log = log.clone();
            std::thread::spawn(move || fill(&log, "kept", 600))
        };
        log.delete_topic("doomed").unwrap();
        grow.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        trim.join().unwrap();
        // New segments of `kept` take keyspaces from the pool.
        fill(&log, "kept", 600);
        let names: Vec<String> = log
            .pool
            .lock()
            .unwrap()
            .ready
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let unique: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "round {round}: pool {names:?}");
        assert_eq!(
            offsets(&log, "kept", 0, 0),
            (0..1200).collect::<Vec<_>>(),
            "round {round}"
        );
        let report = log.check().unwrap();
        assert!(
            report.problems.is_empty(),
            "round {round}: {:?}",
            report.problems
        );
    }
}

/// Records missing inside what retention keeps are reported as damage when read, not passed
/// off as a retention skip (the consumer would count them as deleted by retention).
#[test]
fn records_missing_where_retention_keeps_them_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    log.create_topic("t", 1).unwrap();
    fill(&log, "t", 100);
    let seg = log.topic("t").unwrap().active();
    for o in 40..50u64 {
        seg.ks.remove(codec::record_key("t", 0, o)).unwrap();
    }
    assert_eq!(log.read("t", 0, 0, 100).unwrap().len(), 40);
    let e = log.read("t", 0, 40, 100).unwrap_err().to_string();
    assert!(e.contains("40 to 49 are missing"), "{e}");
    let report = log.check().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("offset 50 follows 39")),
        "{:?}",
        report.problems
    );
}

/// A crash at each step of a segment's deletion, made deterministic: after the definition's
/// durable removal (the keyspace still full), and after its tables were dropped but before the
/// keyspace was cleared. Reopened, the log holds every record of the kept segments, the
/// orphaned keyspace is emptied for reuse (new segments that take it hold only their own
/// records), a group resumes at its committed offset if kept or else at the oldest kept record,
/// and `check` finds nothing wrong.
#[test]
fn a_crash_between_the_steps_of_a_deletion_loses_nothing_kept() {
    for tables_dropped in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (start, total) = {
            let log = EmbeddedLog::open(dir.path()).unwrap();
            log.create_topic_retained("t", 1, small(None, Policy::Limits))
                .unwrap();
            fill(&log, "t", 600);
            log.commit_batch(
                "behind",
                Commit {
                    offsets: vec![("t".into(), 0, 3)],
                    ..Commit::default()
                },
            )
            .unwrap();
            let t = log.topic("t").unwrap();
            let segs = t.segments.read().unwrap().clone();
            assert!(segs.len() >= 3, "{} segments", segs.len());
            // Step one: the definition goes, durably.
            let mut batch = log.db.batch();
            batch.remove(&log.meta, codec::segment_key("t", segs[0].id));
            batch.commit().unwrap();
            log.db.persist(PersistMode::SyncAll).unwrap();
            if tables_dropped {
                segments::drop_tables(&segs[0].ks);
            }
            // The crash: nothing more of the deletion runs.
            (segs[1].base[0], 600u64)
        };
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let case = if tables_dropped {
            "tables dropped"
        } else {
            "keyspace full"
        };
        assert_eq!(log.topic("t").unwrap().start(0), start, "{case}");
        assert_eq!(
            offsets(&log, "t", 0, 0),
            (start..total).collect::<Vec<_>>(),
            "{case}"
        );
        // The group committed below what is kept: it resumes at the oldest kept record.
        let from = log.committed_offset("behind", "t", 0).unwrap();
        assert_eq!(from, 3, "{case}");
        assert_eq!(
            log.read("t", 0, from, 1).unwrap()[0].offset,
            start,
            "{case}"
        );
        // New segments take keyspaces from the pool, the orphan among them.
        fill(&log, "t", 600);
        assert_eq!(
            offsets(&log, "t", 0, 0),
            (start..total + 600).collect::<Vec<_>>(),
            "{case}"
        );
        let report = log.check().unwrap();
        assert!(report.problems.is_empty(), "{case}: {:?}", report.problems);
    }
}
