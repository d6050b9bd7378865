//! Packs an app directory into a bundle file and prints its SHA-256: `pack DIR OUT`.
//! Used by the benchmarks to make large bundles the way `em deploy` would.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, out] = &args[..] else {
        eprintln!("usage: pack DIR OUT");
        return ExitCode::from(2);
    };
    let file = match std::fs::File::create(out) {
        Ok(f) => std::io::BufWriter::new(f),
        Err(e) => {
            eprintln!("pack: cannot create {out}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match px_bundle::pack_dir(std::path::Path::new(dir), file) {
        Ok((summary, _)) => {
            println!("{} {}", summary.sha256, summary.size);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pack: {e}");
            ExitCode::FAILURE
        }
    }
}
