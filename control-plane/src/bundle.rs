//! Agent bundles: the agent directory packed as a gzip-compressed tar.
