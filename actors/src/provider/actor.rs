//! `ProviderActor`: one per configured provider, wrapping a `Provider`. Its operations run as
//! futures inside its context, so a panicking backend takes the actor down and the
//! `ProviderRouter` restarts it with a fresh instance.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;

use super::{
    LogStream, Provider, ProviderError, ProviderHealth, SandboxExit, SandboxHandle, SandboxInfo,
    SpawnRequest,
};
use crate::model::Usage;

/// Sent to the router when a provider actor stops, for whatever reason.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ProviderExited {
    pub name: String,
    pub generation: u64,
}

pub struct ProviderActor {
    name: String,
    generation: u64,
    provider: Arc<dyn Provider>,
    on_exit: Recipient<ProviderExited>,
}

impl ProviderActor {
    pub fn new(
        name: String,
        generation: u64,
        provider: Arc<dyn Provider>,
        on_exit: Recipient<ProviderExited>,
    ) -> Self {
        ProviderActor {
            name,
            generation,
            provider,
            on_exit,
        }
    }
}

impl Actor for ProviderActor {
    type Context = Context<Self>;
}

impl Drop for ProviderActor {
    // Runs on a normal stop and when a panic unwinds the actor's task alike.
    fn drop(&mut self) {
        self.on_exit.do_send(ProviderExited {
            name: self.name.clone(),
            generation: self.generation,
        });
    }
}

#[derive(Message)]
#[rtype(result = "Result<SandboxHandle, ProviderError>")]
pub struct Spawn(pub SpawnRequest);

#[derive(Message)]
#[rtype(result = "Result<SandboxExit, ProviderError>")]
pub struct Wait(pub SandboxHandle);

#[derive(Message)]
#[rtype(result = "Result<(), ProviderError>")]
pub struct Terminate(pub SandboxHandle);

#[derive(Message)]
#[rtype(result = "Result<(), ProviderError>")]
pub struct Kill(pub SandboxHandle);

#[derive(Message)]
#[rtype(result = "Result<LogStream, ProviderError>")]
pub struct Logs {
    pub sandbox: SandboxHandle,
    pub follow: bool,
}

#[derive(Message)]
#[rtype(result = "Result<Option<Usage>, ProviderError>")]
pub struct ReadUsage(pub SandboxHandle);

#[derive(Message)]
#[rtype(result = "Result<Vec<SandboxInfo>, ProviderError>")]
pub struct List(pub BTreeMap<String, String>);

#[derive(Message)]
#[rtype(result = "ProviderHealth")]
pub struct CheckHealth;

impl Handler<Spawn> for ProviderActor {
    type Result = ResponseActFuture<Self, Result<SandboxHandle, ProviderError>>;
    fn handle(&mut self, msg: Spawn, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        let span = msg.0.span.clone();
        Box::pin(
            tracing::Instrument::instrument(async move { p.spawn(msg.0).await }, span)
                .into_actor(self),
        )
    }
}

impl Handler<Wait> for ProviderActor {
    type Result = ResponseActFuture<Self, Result<SandboxExit, ProviderError>>;
    fn handle(&mut self, msg: Wait, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        Box::pin(async move { p.wait(&msg.0).await }.into_actor(self))
    }
}

impl Handler<Terminate> for ProviderActor {
    type Result = ResponseActFuture<Self, Result<(), ProviderError>>;
    fn handle(&mut self, msg: Terminate, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        Box::pin(async move { p.stop(&msg.0).await }.into_actor(self))
    }
}

impl Handler<Kill> for ProviderActor {
    type Result = ResponseActFuture<Self, Result<(), ProviderError>>;
    fn handle(&mut self, msg: Kill, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        Box::pin(async move { p.kill(&msg.0).await }.into_actor(self))
    }
}

impl Handler<Logs> for ProviderActor {
    type Result = ResponseActFuture<Self, Result<LogStream, ProviderError>>;
    fn handle(&mut self, msg: Logs, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        Box::pin(async move { p.logs(&msg.sandbox, msg.follow).await }.into_actor(self))
    }
}

impl Handler<ReadUsage> for ProviderActor {
    type Result = ResponseActFuture<Self, Result<Option<Usage>, ProviderError>>;
    fn handle(&mut self, msg: ReadUsage, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        Box::pin(async move { p.usage(&msg.0).await }.into_actor(self))
    }
}

impl Handler<List> for ProviderActor {
    type Result = ResponseActFuture<Self, Result<Vec<SandboxInfo>, ProviderError>>;
    fn handle(&mut self, msg: List, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        Box::pin(async move { p.list(&msg.0).await }.into_actor(self))
    }
}

impl Handler<CheckHealth> for ProviderActor {
    type Result = ResponseActFuture<Self, ProviderHealth>;
    fn handle(&mut self, _: CheckHealth, _: &mut Context<Self>) -> Self::Result {
        let p = self.provider.clone();
        Box::pin(async move { p.health().await }.into_actor(self))
    }
}
