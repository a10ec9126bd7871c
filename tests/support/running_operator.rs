//! The operator's controllers on a task of their own, stopped on demand: how the
//! end-to-end tests run, "kill" and restart the operator against an API server.

use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::controller::{Operator, wait_for};
use bitbucket_operator::egress::{EgressArgs, EgressPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running [`Operator::run_controllers`]; [`RunningOperator::stop`] shuts it down.
pub struct RunningOperator {
    /// The operator, to look at its manager, metrics and sessions while it runs.
    pub operator: Arc<Operator>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// How long a clean shutdown may take before the test fails.
    stop_within: Duration,
}

impl RunningOperator {
    /// Starts the controllers; `stop_within` bounds [`RunningOperator::stop`], so a hang
    /// on shutdown fails the test instead of blocking it.
    pub fn spawn(operator: Operator, stop_within: Duration) -> Self {
        let operator = Arc::new(operator);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn({
            let operator = Arc::clone(&operator);
            async move { operator.run_controllers(wait_for(stopped)).await }
        });
        RunningOperator {
            operator,
            stop,
            task,
            stop_within,
        }
    }

    /// Signals shutdown and waits until every controller loop has returned.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(self.stop_within, self.task)
            .await
            .expect("the operator stops on shutdown")
            .unwrap();
    }
}

/// An allow-list of exactly `api_url`: the simulator listens on loopback, which the
/// operator refuses unless the administrator lists it (as a test must, too).
pub fn allow_only(api_url: &str) -> EgressPolicy {
    EgressArgs {
        allowed_api_urls: vec![api_url.to_owned()],
        ..EgressArgs::default()
    }
    .policy()
    .expect("a valid allow-list")
}

/// Sends the operator's tracing to the test's captured output (`RUST_LOG` filters it);
/// safe to call from every test of a binary.
pub fn trace_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
