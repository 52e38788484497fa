//! When and where the control task reconnects, without IO: which
//! coordinator address comes next, how long to wait first, and which
//! refusals end the task. The task passes in the jitter and does the
//! sleeping.

use std::time::Duration;

use weft_proto::RefusalCode;

/// Refusals that reconnecting cannot cure; only the operator can.
pub(crate) fn is_final_refusal(code: RefusalCode) -> bool {
    !matches!(
        code,
        RefusalCode::Unavailable | RefusalCode::MachineKeyInUse
    )
}

/// The least wait after the coordinator said another connection holds this
/// machine key (a clone of this machine): retrying sooner would only take
/// the node from the other machine or be refused again.
const IN_USE_RETRY: Duration = Duration::from_secs(30);

/// What the task does after an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// A final refusal: the task ends.
    Stop,
    /// Try the next address at once.
    Now,
    /// Wait this long first.
    Wait {
        delay: Duration,
        /// Another connection holds this machine key.
        in_use: bool,
    },
}

/// Which coordinator address the control task tries next, and whether it
/// must wait first: it moves to the next address after every attempt that
/// ends (a session that dropped, or one that never started), and backs off
/// only once every address in a round failed.
#[derive(Debug, Clone)]
pub(crate) struct Failover {
    next: usize,
    failed: usize,
    backoff: Backoff,
}

impl Failover {
    pub(crate) fn new() -> Self {
        Self {
            next: 0,
            failed: 0,
            backoff: Backoff::new(),
        }
    }

    /// Whether the next attempt starts a new round over `count` addresses,
    /// so names should be resolved again.
    pub(crate) fn round_starts(&self, count: usize) -> bool {
        self.next == 0 || self.next >= count
    }

    /// The index, among `count` addresses, to try now.
    pub(crate) fn pick(&mut self, count: usize) -> usize {
        let index = self.next % count.max(1);
        self.next = index + 1;
        index
    }

    /// Decides what follows an attempt over `count` addresses that ended
    /// with `refusal` (or a failure, when `None`), after the coordinator
    /// accepted the node or not (`registered`); `jitter` in `[0, 1)`.
    pub(crate) fn after(
        &mut self,
        refusal: Option<RefusalCode>,
        registered: bool,
        count: usize,
        jitter: f64,
    ) -> Next {
        if refusal.is_some_and(is_final_refusal) {
            return Next::Stop;
        }
        // A refusal to retry (the coordinator unavailable, or this node's
        // netmap too large to send) waits out the backoff like a failed
        // connection: registering again at once would only be refused again.
        let delay = self.finished(registered && refusal.is_none(), count, jitter);
        if refusal == Some(RefusalCode::MachineKeyInUse) {
            let least = IN_USE_RETRY.mul_f64(0.8 + 0.4 * jitter);
            return Next::Wait {
                delay: delay.map_or(least, |d| d.max(least)),
                in_use: true,
            };
        }
        match delay {
            Some(delay) => Next::Wait {
                delay,
                in_use: false,
            },
            None => Next::Now,
        }
    }

    /// Records how an attempt ended (`registered`: the coordinator accepted
    /// the node) and returns how long to wait before the next attempt.
    fn finished(&mut self, registered: bool, count: usize, jitter: f64) -> Option<Duration> {
        if registered {
            self.failed = 0;
            self.backoff.reset();
            return None;
        }
        self.failed += 1;
        if self.failed < count {
            return None;
        }
        self.failed = 0;
        Some(self.backoff.next_delay(jitter))
    }
}

/// Reconnect delays: 0.5 s doubling to 30 s, each scaled by a jitter factor
/// so a fleet of nodes does not reconnect in lockstep after an outage.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The next delay; `jitter` in `[0, 1)` picks a point in 80–120 % of the base.
    fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay(0.5)).collect();
        assert_eq!(delays[0], Duration::from_millis(500));
        assert_eq!(delays[1], Duration::from_secs(1));
        assert_eq!(delays[6], Duration::from_secs(30));
        assert_eq!(delays[9], Duration::from_secs(30));

        let mut low = Backoff::new();
        let mut high = Backoff::new();
        assert_eq!(low.next_delay(0.0), Duration::from_millis(400));
        assert_eq!(high.next_delay(0.999_999).as_millis(), 599);

        backoff.reset();
        assert_eq!(backoff.next_delay(0.5), Duration::from_millis(500));
    }

    #[test]
    fn failover_moves_on_after_every_attempt_and_backs_off_after_a_failed_round() {
        let mut failover = Failover::new();
        assert!(failover.round_starts(3));
        assert_eq!(failover.pick(3), 0);
        // The first address worked, then its session dropped: straight to the next.
        assert_eq!(failover.finished(true, 3, 0.5), None);
        assert!(!failover.round_starts(3));
        assert_eq!(failover.pick(3), 1);
        assert_eq!(failover.finished(false, 3, 0.5), None);
        assert_eq!(failover.pick(3), 2);
        assert_eq!(failover.finished(false, 3, 0.5), None);
        assert!(failover.round_starts(3));
        assert_eq!(failover.pick(3), 0);
        // Three failures in a row, a whole round: wait, doubling each round.
        assert_eq!(
            failover.finished(false, 3, 0.5),
            Some(Duration::from_millis(500))
        );
        for _ in 0..2 {
            failover.pick(3);
            assert_eq!(failover.finished(false, 3, 0.5), None);
        }
        failover.pick(3);
        assert_eq!(
            failover.finished(false, 3, 0.5),
            Some(Duration::from_secs(1))
        );
        // Success resets the backoff.
        failover.pick(3);
        assert_eq!(failover.finished(true, 3, 0.5), None);
        for _ in 0..2 {
            failover.pick(3);
            assert_eq!(failover.finished(false, 3, 0.5), None);
        }
        failover.pick(3);
        assert_eq!(
            failover.finished(false, 3, 0.5),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn a_single_address_backs_off_after_each_failure() {
        let mut failover = Failover::new();
        assert_eq!(failover.pick(1), 0);
        assert_eq!(failover.finished(true, 1, 0.5), None);
        assert!(failover.round_starts(1));
        assert_eq!(failover.pick(1), 0);
        assert_eq!(
            failover.finished(false, 1, 0.5),
            Some(Duration::from_millis(500))
        );
        // Nothing resolved: still a failed round.
        assert_eq!(
            failover.finished(false, 0, 0.5),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_final_refusal_stops_and_others_retry() {
        let mut failover = Failover::new();
        assert_eq!(
            failover.after(Some(RefusalCode::NodeDeleted), true, 1, 0.5),
            Next::Stop
        );
        // A session that registered and then dropped goes straight on.
        assert_eq!(failover.after(None, true, 1, 0.5), Next::Now);
    }

    #[test]
    fn a_refusal_after_registration_still_backs_off() {
        let mut failover = Failover::new();
        assert_eq!(
            failover.after(Some(RefusalCode::Unavailable), true, 1, 0.5),
            Next::Wait {
                delay: Duration::from_millis(500),
                in_use: false
            }
        );
        assert_eq!(
            failover.after(Some(RefusalCode::Unavailable), true, 1, 0.5),
            Next::Wait {
                delay: Duration::from_secs(1),
                in_use: false
            }
        );
    }

    #[test]
    fn a_machine_key_in_use_waits_at_least_half_a_minute() {
        let mut failover = Failover::new();
        // Another replica is left in the round, yet the clone must wait.
        assert_eq!(
            failover.after(Some(RefusalCode::MachineKeyInUse), true, 2, 0.5),
            Next::Wait {
                delay: IN_USE_RETRY,
                in_use: true
            }
        );
        let Next::Wait { delay, in_use } =
            failover.after(Some(RefusalCode::MachineKeyInUse), false, 2, 0.0)
        else {
            panic!("a machine key in use must wait");
        };
        assert!(in_use);
        assert_eq!(delay, IN_USE_RETRY.mul_f64(0.8));
    }
}
