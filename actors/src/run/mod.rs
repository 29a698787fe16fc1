pub mod actor;
pub mod messages;
pub mod state;

pub use actor::{RunActor, RunDeps, RunRegistry, RunSettings, RunSpec, RunTimeouts};
