pub mod actor;
pub mod adopt;
pub mod messages;
pub mod state;

pub use actor::{
    detached_adopt_span, provider_slot, sandbox_blob_key, AdoptSpan, ExportSpans, RunActor,
    RunDeps, RunRegistry, RunSettings, RunSpec, RunTimeouts, StoredSpec, CLOSE_RUN_MOVED,
    DEFAULT_EVIDENCE_LINES,
};
pub use adopt::{adopt, AdoptError};
