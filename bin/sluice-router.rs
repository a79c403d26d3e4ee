use std::process::ExitCode;

fn main() -> ExitCode {
    match sluice_router::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The error and its causes on one line, and no backtrace even under RUST_BACKTRACE:
            // the launcher shows a child's last stderr lines as the reason it stopped.
            eprintln!("sluice-router: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
