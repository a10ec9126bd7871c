//! The operator against the fake API server, the Bitbucket simulator and the fake
//! ConductorOne tenant: the harness of the ConductorOne session and credential-rotation
//! tests. Each test file adds the Secrets and connectors it needs in an `impl Harness`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::controller::Operator;
use bitbucket_operator::egress::EgressArgs;
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::simulator::{SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use serde_json::Value;

use super::fake_c1::{FakeC1, FakeOptions};
use super::fake_kube::FakeKube;
use super::running_operator::RunningOperator;

pub const API: &str = "connectors.dev/v1alpha1";
pub const KIND: &str = "BitbucketConnector";
/// The namespace of the connectors and Secrets.
pub const NS: &str = "identity";
pub const WAIT: Duration = Duration::from_secs(30);
/// The label a Secret needs for the operator to read it.
pub const OPT_IN_LABEL: &str = "connectors.dev/bitbucket-credentials";

/// The three fakes and the operator running against them, over an in-memory store.
pub struct Harness {
    pub kube: FakeKube,
    pub sim: SimulatorHandle,
    pub c1: FakeC1,
    pub operator: Arc<Operator>,
    running: RunningOperator,
}

impl Harness {
    /// `allow_c1`: whether the administrator lists the fake tenant's host (the
    /// simulator's is always listed).
    pub async fn start(allow_c1: bool) -> Harness {
        let kube = FakeKube::start().await;
        let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let c1 = FakeC1::start(FakeOptions::default()).await;
        let mut egress = EgressArgs {
            allowed_api_urls: vec![sim.base_url()],
            ..EgressArgs::default()
        };
        if allow_c1 {
            egress.allowed_conductorone_urls = vec![format!("https://{}", c1.api_host())];
        }
        let operator = Operator::new(
            kube.client(),
            Arc::new(Store::open_in_memory().unwrap()),
            Arc::new(Metrics::default()),
            vec![],
            egress.policy().expect("a valid allow-list"),
        );
        let running = RunningOperator::spawn(operator, WAIT);
        Harness {
            kube,
            sim,
            c1,
            operator: Arc::clone(&running.operator),
            running,
        }
    }

    /// Stops the controllers, then the simulator.
    pub async fn stop(self) {
        self.running.stop().await;
        self.sim.shutdown().await;
    }

    /// Waits until the connector `name` satisfies `pred`.
    pub async fn wait(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.kube.wait_for(API, KIND, Some(NS), name, WAIT, pred).await
    }
}
