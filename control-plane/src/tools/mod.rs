//! Tools executed against the project workspace.
