//! `beacon-loadgen`: parse arguments, run the Beacon scale benchmark, print its table.
//! Everything else is in the `px_bench` library, so the integration test runs the same code.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = px_bench::Options::parse();
    // On Ctrl-C the benchmark future is dropped, which kills Beacon (`kill_on_drop`) and
    // removes the temporary directory, instead of leaving an orphaned Beacon behind.
    let report = tokio::select! {
        report = px_bench::run(&options) => report?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; beacon stopped"),
    };
    println!("{report}");
    Ok(())
}
