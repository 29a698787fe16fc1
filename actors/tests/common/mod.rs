//! Shared fixtures of the actors integration tests.
#![allow(dead_code)]

pub mod redis_server;

use std::collections::BTreeMap;

use actors::model::{Resources, RunRecord, RunState, Usage};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A pending run of agent `explorer` on `local`, created now; adjust with the `with_*` methods.
pub fn run() -> RunRecord {
    RunRecord {
        id: Uuid::new_v4(),
        agent: "explorer".into(),
        task: "t".into(),
        provider: "local".into(),
        state: RunState::Pending,
        remote_host: None,
        sandbox_id: None,
        created_at: Utc::now(),
        state_times: BTreeMap::new(),
        exit_code: None,
        failure: None,
        termination: None,
        resources: Resources::default(),
        usage: Usage::default(),
        cost_estimate: None,
        trace_id: String::new(),
        owner: "test".into(),
        timeout_s: None,
        result: None,
        evidence: None,
        env_names: vec![],
    }
}

pub trait RunRecordExt {
    fn with_agent(self, agent: &str) -> Self;
    fn with_provider(self, provider: &str) -> Self;
    fn with_state(self, state: RunState) -> Self;
    fn created(self, at: DateTime<Utc>) -> Self;
}

impl RunRecordExt for RunRecord {
    fn with_agent(mut self, agent: &str) -> Self {
        self.agent = agent.into();
        self
    }
    fn with_provider(mut self, provider: &str) -> Self {
        self.provider = provider.into();
        self
    }
    fn with_state(mut self, state: RunState) -> Self {
        self.state = state;
        self
    }
    fn created(mut self, at: DateTime<Utc>) -> Self {
        self.created_at = at;
        self
    }
}
