//! The `tokend` binary: parse the command line, start logging, dispatch, and
//! turn the outcome into an exit code (0 ok, 1 refused or failed, 64 usage).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match tokend::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                tokend::EXIT_USAGE
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    tokend::init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokend: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(runtime.block_on(tokend::run_cli(cli)))
}
