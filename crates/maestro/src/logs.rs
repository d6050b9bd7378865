//! App and access logs on disk.
