//! Helpers for Platform.X integration tests.
