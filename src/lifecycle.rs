//! The closing scheduler: closes polls whose `closesAt` has come. Each process runs one; the
//! store hands each due poll to exactly one of them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use pollcast_actors::service::PollService;

/// How often due polls are looked for: the close marker goes out at most this late (votes
/// are refused from `closesAt` on regardless, by every process's own clock).
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// A closed poll whose final counts are still unpublished after this long gets its close
/// marker again (the first was lost, e.g. the process crashed between closing and
/// appending it).
const RESEND_AFTER: Duration = Duration::from_secs(30);

/// Runs the scheduler until `stop` is cancelled (start-up runs it in the background's
/// `Intake` stage).
pub async fn run_closer(polls: PollService, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match polls.close_due_polls(RESEND_AFTER).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("closing scheduler recovered");
            }
            Ok(_) => {}
            // Why log only the first failure: during an outage this runs twice a second.
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(error = %err, "could not close due polls; will keep trying");
            }
            Err(_) => {}
        }
    }
}
