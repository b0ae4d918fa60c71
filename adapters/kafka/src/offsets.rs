//! Which offset of a partition may be committed, when messages settle out of order.
//!
//! Kafka remembers one position per partition: everything before it counts as done. With
//! concurrent handlers, message 7 may be acked before message 5; committing 8 then would
//! lose 5 on a crash. So only the contiguous settled prefix is committed, as Go CDK's Kafka
//! driver does: the position is the lowest offset still open.

use std::collections::BTreeSet;

/// One partition's open offsets.
#[derive(Debug, Default)]
pub(crate) struct PartitionOffsets {
    /// Received and not yet settled (handed out, parked behind a key, or waiting out a delay).
    open: BTreeSet<i64>,
    /// One past the highest offset received.
    end: Option<i64>,
    /// The position last handed to Kafka.
    stored: Option<i64>,
}

impl PartitionOffsets {
    /// A record at `offset` arrived.
    pub fn received(&mut self, offset: i64) {
        // The first record read is where this partition was resumed: nothing to store yet.
        self.stored.get_or_insert(offset);
        self.open.insert(offset);
        self.end = Some(self.end.map_or(offset + 1, |end| end.max(offset + 1)));
    }

    /// The record at `offset` is settled. Returns the new position to commit when it moved.
    pub fn settled(&mut self, offset: i64) -> Option<i64> {
        self.open.remove(&offset);
        let position = self.position()?;
        if self.stored.is_some_and(|stored| stored >= position) {
            return None;
        }
        self.stored = Some(position);
        Some(position)
    }

    /// The position to commit: the lowest open offset, else one past the highest received.
    pub fn position(&self) -> Option<i64> {
        self.open.first().copied().or(self.end)
    }

    /// Offsets still open.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_settled_prefix() {
        let mut p = PartitionOffsets::default();
        for offset in 5..10 {
            p.received(offset);
        }
        assert_eq!(p.settled(7), None, "5 and 6 are still open");
        assert_eq!(p.settled(6), None);
        assert_eq!(p.settled(5), Some(8), "5, 6 and 7 done: resume at 8");
        assert_eq!(p.settled(9), None, "8 is open");
        assert_eq!(p.settled(8), Some(10));
        assert_eq!(p.open(), 0);
    }

    #[test]
    fn never_moves_back() {
        let mut p = PartitionOffsets::default();
        p.received(1);
        assert_eq!(p.settled(1), Some(2));
        p.received(0); // a redelivery after a seek: already behind the stored position
        assert_eq!(p.settled(0), None);
    }

    #[test]
    fn random_settlement_orders_commit_exactly_what_is_done() {
        use rand::seq::SliceRandom;
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let mut p = PartitionOffsets::default();
            let n = 50;
            (0..n).for_each(|o| p.received(o));
            let mut order: Vec<i64> = (0..n).collect();
            order.shuffle(&mut rng);
            let mut done = BTreeSet::new();
            let mut committed = 0;
            for o in order {
                done.insert(o);
                if let Some(position) = p.settled(o) {
                    assert!(position > committed);
                    committed = position;
                }
                // Everything below the committed position is done.
                assert!((0..committed).all(|x| done.contains(&x)));
                // And the position is as far as it may go.
                let prefix = (0..n).take_while(|x| done.contains(x)).count() as i64;
                assert_eq!(committed, prefix);
            }
            assert_eq!(committed, n);
        }
    }
}
