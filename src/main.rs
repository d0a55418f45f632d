//! The `tokend` binary: parse the command line, start logging, dispatch, and
//! turn the outcome into an exit code (0 ok, 1 refused or failed, 64 usage).

use std::process::ExitCode;

use clap::Parser;

/// The daemon's allocator: mimalloc, whose per-thread free lists cut the
/// allocator's share of a verify (glibc malloc was ~8 % of the server's
/// CPU in the e2e bench's profile). Built with `no_thp`: it does not ask
/// for transparent huge pages, which tripled the sidecar's peak RSS where
/// THP is `madvise` (measured: 33.8 MiB → 17.5 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Where transparent huge pages are `always`, the kernel backs the
    // allocator's arenas with 2 MiB pages whatever mimalloc asks: turn THP
    // off for this process (it only ever lowers memory use).
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
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
    let code = runtime.block_on(tokend::run_cli(cli));
    // The daemon has drained and stopped its tasks; a key still being
    // generated on the blocking pool is not needed any more (and every
    // write is atomic), so exit without waiting for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}
