//! The `codebolt` control plane: configuration, tools, the HTTP API server and the CLI client.

pub mod bundle;
pub mod config;
pub mod prometheus;
pub mod server;
pub mod telemetry;
pub mod tools;

/// The memory allocator of the processes that host the server (`codebolt`, the load-tests
/// harness). The server's threads free much of what other threads allocated (frames handed
/// between actors, spans handed to the exporter's thread); mimalloc takes such frees without
/// the arena locks of the system allocator.
pub use mimalloc::MiMalloc as Allocator;
