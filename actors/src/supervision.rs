//! Restart policy shared by the supervisors.
//!
//! ractor has no restart strategy of its own (its default `handle_supervisor_evt` stops the
//! supervisor), so each supervisor here overrides it and asks a [`RestartBudget`] whether,
//! and after how long, a failed child may be restarted.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// How often and how fast children are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed within `window`; one more failure escalates.
    pub max_restarts: u32,
    /// The sliding window over which restarts are counted.
    pub window: Duration,
    /// Delay before the first restart; doubled for each further restart in the window.
    pub backoff_initial: Duration,
    /// Upper bound of the delay.
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// The restarts a supervisor has made recently, judged against its [`RestartPolicy`].
#[derive(Debug)]
pub struct RestartBudget {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    /// A budget with no restarts spent.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
        }
    }

    /// Records a failure. Returns the delay before the restart, or the escalation when the
    /// budget is spent.
    pub fn on_failure(&mut self, what: &str) -> Result<Duration, Escalation> {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() as u32 >= self.policy.max_restarts {
            return Err(Escalation {
                what: what.to_owned(),
                restarts: self.recent.len() as u32,
                window: self.policy.window,
            });
        }
        self.recent.push_back(now);
        let backoff = crate::Backoff {
            initial: self.policy.backoff_initial,
            max: self.policy.backoff_max,
        };
        Ok(backoff.after(self.recent.len() as u32))
    }
}

/// A supervisor gave up: a child kept failing past the restart budget. Supervisors fail with
/// this error, and the root supervisor stops the process when it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    /// What kept failing.
    pub what: String,
    /// Restarts already made within the window.
    pub restarts: u32,
    /// The window.
    pub window: Duration,
}

impl fmt::Display for Escalation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed again after {} restarts within {:?}: restart budget exhausted",
            self.what, self.restarts, self.window
        )
    }
}

impl std::error::Error for Escalation {}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32) -> RestartPolicy {
        RestartPolicy {
            max_restarts: max,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
        }
    }

    #[tokio::test]
    async fn backoff_doubles_up_to_its_bound() {
        let mut budget = RestartBudget::new(policy(10));
        let delays: Vec<_> = (0..4).map(|_| budget.on_failure("x").unwrap()).collect();
        assert_eq!(
            delays,
            [100, 200, 350, 350].map(Duration::from_millis).to_vec()
        );
    }

    #[tokio::test]
    async fn failure_past_the_budget_escalates() {
        let mut budget = RestartBudget::new(policy(2));
        budget.on_failure("agg").unwrap();
        budget.on_failure("agg").unwrap();
        let escalation = budget.on_failure("agg").unwrap_err();
        assert_eq!(escalation.restarts, 2);
        assert!(escalation.to_string().contains("restart budget exhausted"));
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_outside_the_window_are_forgotten() {
        let mut budget = RestartBudget::new(policy(1));
        budget.on_failure("agg").unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(budget.on_failure("agg").is_ok());
    }
}
