//! The sequence-to-receipt map of a per-message source ([`Settle::PerMessage`]), kept once here
//! rather than in each queue's source.
//!
//! The engine tracks a queue's messages by a local sequence number (its "offset"); the broker
//! settles each by a receipt it issued (RabbitMQ's delivery tag, a Redis stream entry id, a
//! JetStream ack subject, an SQS receipt handle). A receipt belongs to the link that received
//! it (its generation): where a broker takes a lost link's messages back (RabbitMQ requeues
//! what a closed channel had not acked), the receipts of the old link are void, and the
//! partition that holds them must start over ([`SourceError::Lost`]) before it is handed
//! anything of the new link's. Brokers whose receipts outlive a connection (Redis, JetStream,
//! SQS) stay on generation 0.
//!
//! [`Settle::PerMessage`]: super::Settle::PerMessage
//! [`SourceError::Lost`]: super::SourceError::Lost

use std::collections::HashMap;

/// One queue's receipts and counters.
#[derive(Debug)]
pub struct Receipts<R> {
    /// The sequence number the next delivery gets.
    next_seq: u64,
    /// How many deliveries were settled (acked, dead-lettered, given back with a delay).
    settled: u64,
    /// How many were voided (their link was lost, or they were released): the broker delivers
    /// them again, under new numbers. Settled + voided + held = the numbers handed out.
    voided: u64,
    /// Set when receipts were voided under a partition that still runs: it must end before it
    /// gets anything more, and [`Receipts::release`] clears it once it has.
    restarting: bool,
    /// Sequence number to (generation, receipt).
    held: HashMap<u64, (u64, R)>,
}

impl<R> Default for Receipts<R> {
    fn default() -> Self {
        Receipts {
            next_seq: 0,
            settled: 0,
            voided: 0,
            restarting: false,
            held: HashMap::new(),
        }
    }
}

/// A commit or a fetch met a receipt of a link that is gone (or voided already): the
/// partition must start over.
#[derive(Debug, PartialEq, Eq)]
pub struct Stale;

impl<R: Clone> Receipts<R> {
    /// Numbers a delivery and keeps its receipt; returns its sequence number.
    pub fn issue(&mut self, generation: u64, receipt: R) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.held.insert(seq, (generation, receipt));
        seq
    }

    /// Numbers a delivery that needs no settling (auto-acked at-most-once deliveries).
    pub fn issue_settled(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.settled += 1;
        seq
    }

    /// The engine's committed offset of the queue: deliveries that will not come back under
    /// their numbers.
    pub fn committed(&self) -> u64 {
        self.settled + self.voided
    }

    /// The sequence number the next delivery gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Receipts held (handed out, neither settled nor voided).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Before a fetch on link `generation`: fails if the partition holds receipts of another
    /// link (voiding them) or is restarting already.
    pub fn check(&mut self, generation: u64) -> Result<(), Stale> {
        if self.restarting || self.void(|g| g != generation) > 0 {
            self.restarting = true;
            return Err(Stale);
        }
        Ok(())
    }

    /// The receipts of `seqs`, all of link `generation`; one that is not (another link's, or
    /// gone already) voids every receipt of another link and fails: nothing of the commit
    /// that names it may be published, since the broker delivers those messages again.
    pub fn get(&mut self, generation: u64, seqs: &[u64]) -> Result<Vec<(u64, R)>, Stale> {
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            match self.held.get(seq) {
                Some((g, r)) if *g == generation => out.push((*seq, r.clone())),
                _ => {
                    self.void(|g| g != generation);
                    self.restarting = true;
                    return Err(Stale);
                }
            }
        }
        Ok(out)
    }

    /// The receipts of those of `seqs` that are held on link `generation`, changing nothing
    /// (a renewal may name a message that was settled meanwhile).
    pub fn peek(&self, generation: u64, seqs: &[u64]) -> Vec<(u64, R)> {
        seqs.iter()
            .filter_map(|seq| match self.held.get(seq) {
                Some((g, r)) if *g == generation => Some((*seq, r.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every receipt held, of any link.
    pub fn receipts(&self) -> impl Iterator<Item = &R> {
        self.held.values().map(|(_, r)| r)
    }

    /// Marks `seqs` settled (their acks went out); numbers already voided are not counted.
    pub fn settle(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            if self.held.remove(&seq).is_some() {
                self.settled += 1;
            }
        }
    }

    /// Voids every receipt of link `generation` under a running partition (its link broke
    /// during a commit, or the broker gave one of its messages to another consumer): the
    /// partition must start over. Returns the voided receipts, for a broker whose receipts
    /// outlive the link to give back.
    pub fn lost(&mut self, generation: u64) -> Vec<R> {
        let gone = self
            .held
            .values()
            .filter(|(g, _)| *g == generation)
            .map(|(_, r)| r.clone())
            .collect();
        self.void(|g| g == generation);
        self.restarting = true;
        gone
    }

    /// The partition ended without settling what it holds: voids every receipt and returns
    /// those of link `generation` (the ones the broker can still be asked to take back), and
    /// lets the partition fetch again.
    pub fn release(&mut self, generation: u64) -> Vec<R> {
        let back = self
            .held
            .values()
            .filter(|(g, _)| *g == generation)
            .map(|(_, r)| r.clone())
            .collect();
        self.void(|_| true);
        self.restarting = false;
        back
    }

    /// Voids the receipts whose generation `gone` says; returns how many.
    fn void(&mut self, gone: impl Fn(u64) -> bool) -> usize {
        let before = self.held.len();
        self.held.retain(|_, (g, _)| !gone(*g));
        let n = before - self.held.len();
        self.voided += n as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_of_a_lost_link_void_the_partition_until_it_is_released() {
        let mut r = Receipts::<u64>::default();
        let (a, b) = (r.issue(1, 10), r.issue(1, 11));
        assert_eq!((a, b), (0, 1));
        assert_eq!(r.get(1, &[a]), Ok(vec![(0, 10)]));
        r.settle([a]);
        assert_eq!(r.committed(), 1);
        // The link moved on to generation 2: `b`'s receipt is void, the partition restarts,
        // and it stays restarting (whatever it fetches) until it is released.
        assert_eq!(r.check(2), Err(Stale));
        assert_eq!(r.committed(), 2, "settled 1 + voided 1");
        assert_eq!(r.check(2), Err(Stale));
        assert_eq!(r.release(2), Vec::<u64>::new());
        assert_eq!(r.check(2), Ok(()));
        let c = r.issue(2, 1);
        assert_eq!(c, 2);
        // A commit naming a voided number fails, and settles nothing.
        assert_eq!(r.get(2, &[b, c]), Err(Stale));
        assert_eq!(r.committed(), 2);
    }

    #[test]
    fn release_gives_back_the_current_links_receipts_and_counts_them() {
        let mut r = Receipts::<&str>::default();
        r.issue(0, "x");
        r.issue(0, "y");
        r.issue_settled();
        let mut back = r.release(0);
        back.sort_unstable();
        assert_eq!(back, ["x", "y"]);
        assert_eq!((r.committed(), r.next_seq(), r.held()), (3, 3, 0));
        // A late settle of a released number counts nothing twice.
        r.settle([0, 1]);
        assert_eq!(r.committed(), 3);
    }
}
