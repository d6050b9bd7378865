//! `em dev`: run an app locally the way Maestro would.

use std::path::Path;

use crate::failure::Result;

pub async fn dev(_dir: &Path, _port: u16) -> Result<()> {
    Err(crate::failure::Failure::failed(
        "em dev is not available yet",
    ))
}
