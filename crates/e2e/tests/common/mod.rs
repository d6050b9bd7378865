//! What several end-to-end test files share.

pub mod acme_stack;
pub mod relay;
pub mod webdriver;
pub mod webhook;
