//! `macvhost`: parse the command line, validate it, run the server.

use std::process::ExitCode;

use clap::Parser;
use macvhost::config::{Args, Command, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Stats { path, json }) = &args.command {
        return match macvhost::control::fetch_stats(path) {
            Ok(report) if *json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Ok(report) => {
                print!("{}", macvhost::control::render_table(&report));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("macvhost stats: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.print_capabilities {
        // vhost-user.json: the frontend (libvirt) learns what this backend is.
        println!("{}", macvhost::capabilities_json());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = macvhost::init_logging(&args.log_level) {
        eprintln!("macvhost: --log-level: {e}");
        return ExitCode::from(2);
    }
    // Socket activation: taken before any thread exists (it edits the environment). The
    // vhost-user listener stands in for --socket-path; stored host queues go to the server.
    let mut inherited = match macvhost::systemd::listen_fds() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("macvhost: {e}");
            return ExitCode::from(2);
        }
    };
    let mut args = args;
    match inherited.take_unix_listener(macvhost::systemd::VHOST_USER_FD_NAME) {
        Ok(Some(l)) if args.socket_path.is_none() && args.fd.is_none() => {
            args.fd = Some(std::os::fd::IntoRawFd::into_raw_fd(l));
        }
        Ok(Some(_)) => {
            tracing::warn!("socket activation: using --socket-path/--fd, not the passed socket")
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("macvhost: {e}");
            return ExitCode::from(2);
        }
    }
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("macvhost: {e}");
            return ExitCode::from(2);
        }
    };
    match macvhost::server::run(config, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("macvhost: {e}");
            // The operator named something unusable: like a bad value, status 2.
            ExitCode::from(if e.is_operator_error() { 2 } else { 1 })
        }
    }
}
