//! The commit point of one partition.
//!
//! Messages may finish out of order (later: several lanes per partition; a message that waits
//! for a retry while others go on). The offset that may be committed is the lowest offset not
//! yet finished: everything below it is done. This tracker computes it, in O(log n) per call
//! over the messages in flight, with no I/O and no clock.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
pub struct OffsetTracker {
    /// Offsets that were dispatched and have not finished, with the bytes each holds.
    pending: BTreeMap<u64, u64>,
    /// The bytes of all of them.
    bytes: u64,
    /// The next offset expected to be dispatched (offsets are dispatched in order); before the
    /// first dispatch, the committed offset the tracker started from.
    next_dispatch: u64,
    /// With a per-message source: the offsets that finished since [`OffsetTracker::take_settled`]
    /// last took them, each to be acked by its own receipt.
    settled: Option<Vec<u64>>,
    /// With a per-message source: offsets handed to a commit (to settle, or to give back with
    /// a delay) whose write is not done: the broker still holds them leased to this process.
    settling: BTreeSet<u64>,
}

impl OffsetTracker {
    /// A tracker for a partition whose committed offset is `start`.
    pub fn new(start: u64) -> Self {
        Self {
            pending: BTreeMap::new(),
            bytes: 0,
            next_dispatch: start,
            settled: None,
            settling: BTreeSet::new(),
        }
    }

    /// A tracker that also keeps each finished offset, for a source that settles every message
    /// by itself rather than by the commit point.
    pub fn per_message(start: u64) -> Self {
        Self {
            settled: Some(Vec::new()),
            ..Self::new(start)
        }
    }

    /// The offsets that finished since the last call, in the order they finished (empty unless
    /// made with [`OffsetTracker::per_message`]).
    pub fn take_settled(&mut self) -> Vec<u64> {
        let taken = self
            .settled
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        self.settling.extend(&taken);
        taken
    }

    /// The commit that settled (or gave back) `offsets` is written: the broker has them.
    pub fn settled_done(&mut self, offsets: &[u64]) {
        for o in offsets {
            self.settling.remove(o);
        }
    }

    /// Records that `offset` is in flight. Offsets must be dispatched in increasing order;
    /// gaps (offsets that do not exist: compaction, retention, a broker's transaction markers)
    /// count as finished and cost nothing, however long.
    pub fn dispatch(&mut self, offset: u64) {
        self.dispatch_sized(offset, 0);
    }

    /// [`OffsetTracker::dispatch`] of a message of `bytes` (counted in
    /// [`OffsetTracker::bytes_in_flight`] until it finishes).
    pub fn dispatch_sized(&mut self, offset: u64, bytes: u64) {
        debug_assert!(
            offset >= self.next_dispatch,
            "offsets are dispatched in order"
        );
        if let Some(old) = self.pending.insert(offset, bytes) {
            self.bytes -= old;
        }
        self.bytes += bytes;
        self.next_dispatch = self.next_dispatch.max(offset + 1);
    }

    /// Records that `offset` finished (acked or dead-lettered). Unknown offsets are ignored,
    /// so a late completion after a reset cannot move the commit point.
    pub fn finish(&mut self, offset: u64) {
        if let Some(bytes) = self.pending.remove(&offset) {
            self.bytes -= bytes;
            if let Some(settled) = &mut self.settled {
                settled.push(offset);
            }
        }
    }

    /// Records that `offset` finished without being settled by the engine (given back to the
    /// broker with a delay: [`crate::source::Commit::delayed`] settles it).
    pub fn give_back(&mut self, offset: u64) {
        if let Some(bytes) = self.pending.remove(&offset) {
            self.bytes -= bytes;
            self.settling.insert(offset);
        }
    }

    /// The offsets the broker still has leased to this process, in order: dispatched and not
    /// finished, and (per-message) finished and not yet settled by a written commit.
    pub fn held(&self) -> Vec<u64> {
        let mut all: BTreeSet<u64> = self.pending.keys().copied().collect();
        all.extend(self.settled.iter().flatten());
        all.extend(&self.settling);
        all.into_iter().collect()
    }

    /// The bytes of the messages dispatched and not finished.
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes
    }

    /// The offset to commit: the next one to read after a restart. Everything below the lowest
    /// unfinished offset was dispatched in order and finished (or never existed).
    pub fn commit_point(&self) -> u64 {
        self.pending
            .first_key_value()
            .map_or(self.next_dispatch, |(o, _)| *o)
    }

    /// Messages dispatched and not finished.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_per_message_tracker_hands_over_each_finished_offset_once() {
        let mut t = OffsetTracker::per_message(0);
        for o in 0..4 {
            t.dispatch(o);
        }
        t.finish(2);
        t.finish(0);
        t.finish(2); // a late second completion settles nothing twice
        assert_eq!(t.take_settled(), vec![2, 0]);
        assert_eq!(t.commit_point(), 1, "the watermark is still kept");
        assert!(t.take_settled().is_empty());
        t.finish(3);
        assert_eq!(t.take_settled(), vec![3]);
        let mut w = OffsetTracker::new(0);
        w.dispatch(0);
        w.finish(0);
        assert!(
            w.take_settled().is_empty(),
            "a watermark tracker keeps none"
        );
    }

    #[test]
    fn the_broker_holds_a_message_until_the_commit_that_settles_it_is_written() {
        let mut t = OffsetTracker::per_message(0);
        (0..5).for_each(|o| t.dispatch(o));
        t.finish(1);
        t.give_back(3);
        // Finished or given back, not yet in a written commit: still leased to this process.
        assert_eq!(t.held(), vec![0, 1, 2, 3, 4]);
        assert_eq!(t.in_flight(), 3);
        let taken = t.take_settled();
        assert_eq!(taken, vec![1]);
        assert_eq!(
            t.held(),
            vec![0, 1, 2, 3, 4],
            "the commit is not written yet"
        );
        t.settled_done(&[1, 3]);
        assert_eq!(t.held(), vec![0, 2, 4]);
    }

    #[test]
    fn in_order_completion_moves_the_point_one_by_one() {
        let mut t = OffsetTracker::new(10);
        t.dispatch(10);
        t.dispatch(11);
        assert_eq!(t.commit_point(), 10);
        t.finish(10);
        assert_eq!(t.commit_point(), 11);
        t.finish(11);
        assert_eq!(t.commit_point(), 12);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_slow_message_holds_the_point_until_it_finishes() {
        let mut t = OffsetTracker::new(0);
        for o in 0..5 {
            t.dispatch(o);
        }
        for o in [1, 2, 4] {
            t.finish(o);
        }
        assert_eq!(t.commit_point(), 0, "offset 0 is still running");
        t.finish(0);
        assert_eq!(t.commit_point(), 3, "3 is still running");
        t.finish(3);
        assert_eq!(t.commit_point(), 5);
    }

    #[test]
    fn unknown_and_repeated_completions_change_nothing() {
        let mut t = OffsetTracker::new(0);
        t.dispatch(0);
        t.finish(7);
        t.finish(0);
        t.finish(0);
        assert_eq!(t.commit_point(), 1);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn gaps_in_dispatch_count_as_finished() {
        let mut t = OffsetTracker::new(0);
        t.dispatch(3);
        assert_eq!(t.commit_point(), 3, "0..3 do not exist; 3 is running");
        t.finish(3);
        assert_eq!(t.commit_point(), 4);
    }

    #[test]
    fn a_huge_gap_costs_nothing() {
        let mut t = OffsetTracker::new(0);
        t.dispatch(1_000_000_000);
        t.dispatch(1_000_000_002);
        t.finish(1_000_000_002);
        assert_eq!(t.commit_point(), 1_000_000_000);
        t.finish(1_000_000_000);
        assert_eq!(t.commit_point(), 1_000_000_003);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn commit_point_never_passes_an_unfinished_offset() {
        // Exhaustive over every completion order of 6 messages.
        fn permutations(v: Vec<u64>) -> Vec<Vec<u64>> {
            if v.len() <= 1 {
                return vec![v];
            }
            let mut out = Vec::new();
            for i in 0..v.len() {
                let mut rest = v.clone();
                let x = rest.remove(i);
                for mut p in permutations(rest) {
                    p.insert(0, x);
                    out.push(p);
                }
            }
            out
        }
        for order in permutations((0..6).collect()) {
            let mut t = OffsetTracker::new(0);
            (0..6).for_each(|o| t.dispatch(o));
            let mut done = BTreeSet::new();
            for o in order {
                t.finish(o);
                done.insert(o);
                let expected = (0..6).find(|x| !done.contains(x)).unwrap_or(6);
                assert_eq!(t.commit_point(), expected);
            }
        }
    }

    #[test]
    fn bytes_in_flight_follow_dispatch_and_finish() {
        let mut t = OffsetTracker::new(0);
        t.dispatch_sized(0, 100);
        t.dispatch_sized(1, 50);
        t.dispatch(2);
        assert_eq!(t.bytes_in_flight(), 150);
        t.finish(1);
        t.finish(1);
        t.finish(7);
        assert_eq!(t.bytes_in_flight(), 100);
        t.finish(0);
        t.finish(2);
        assert_eq!(
            (t.bytes_in_flight(), t.in_flight(), t.commit_point()),
            (0, 0, 3)
        );
    }
}
