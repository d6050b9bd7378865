//! maestro, the Platform.X AppController.

pub mod logs;
pub mod proxy;
pub mod routes;
