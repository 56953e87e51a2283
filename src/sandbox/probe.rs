//! `macvhost sandbox-probe` (hidden): seals a small process exactly as the daemon seals itself,
//! then does what its stdin asks, one command per line, answering one line each on stdout.
//! The tests drive it to see what the sandbox allows and denies, and measure it.
//!
//! Commands: `open PATH`, `connect PATH`, `bind PATH`, `syscall NAME [ARG...]`,
//! `thread KIND COMMAND...` (run COMMAND on a new thread under the filter of KIND),
//! `pre COMMAND...` (run COMMAND on the first thread started before sealing, `--threads`),
//! `bench getpid|fcntl|writev N`, `exit`.
//! A command the filter forbids kills the process with SIGSYS (or, with `--seccomp log`,
//! succeeds and is logged by the kernel).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use super::{DirUse, FsIsolation, RunAs, SandboxConfig, SeccompMode, ThreadKind};

/// Options of `macvhost sandbox-probe`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// `enforce` or `log`.
    #[arg(long, default_value = "enforce")]
    pub seccomp: String,
    /// `auto`, `mount-ns` or `landlock`.
    #[arg(long, default_value = "auto")]
    pub fs: String,
    /// A directory the sealed process still uses: `PATH:listen|connect|remove`.
    #[arg(long = "dir", value_name = "PATH:USE")]
    pub dirs: Vec<String>,
    /// Idle threads to start before sealing (to exercise sealing running threads).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Switch to this uid (with --gid).
    #[arg(long)]
    pub uid: Option<u32>,
    /// Switch to this gid (with --uid).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Do not seal (a baseline for measurements).
    #[arg(long)]
    pub no_sandbox: bool,
    /// Open (creating it when absent) tap NAME before sealing, for `bench writev`.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// Print the allowlists as a Markdown table and exit.
    #[arg(long)]
    pub allowlist: bool,
}

fn config(a: &ProbeArgs) -> Result<SandboxConfig, String> {
    let seccomp: SeccompMode = a.seccomp.parse()?;
    let fs = match a.fs.as_str() {
        "auto" => FsIsolation::Auto,
        "mount-ns" => FsIsolation::MountNamespace,
        "landlock" => FsIsolation::Landlock,
        other => return Err(format!("--fs {other}: auto, mount-ns or landlock")),
    };
    let mut dirs = Vec::new();
    for d in &a.dirs {
        let (path, u) = d
            .rsplit_once(':')
            .ok_or_else(|| format!("--dir {d}: PATH:USE"))?;
        let u = match u {
            "listen" => DirUse::Listen,
            "connect" => DirUse::Connect,
            "remove" => DirUse::Remove,
            other => return Err(format!("--dir {d}: unknown use {other}")),
        };
        dirs.push((PathBuf::from(path), u));
    }
    let run_as = match (a.uid, a.gid) {
        (Some(uid), Some(gid)) => Some(RunAs { uid, gid }),
        (None, None) => None,
        _ => return Err("--uid and --gid go together".into()),
    };
    Ok(SandboxConfig {
        disabled: a.no_sandbox,
        seccomp,
        run_as,
        fs,
        dirs,
        helper_pid: None,
    })
}

fn errno_text(e: &std::io::Error) -> String {
    format!("err {}", e.raw_os_error().unwrap_or(0))
}

/// The first thread started before sealing takes commands (`pre ...`) through these.
type PreThread = (
    std::sync::mpsc::Sender<Vec<String>>,
    std::sync::mpsc::Receiver<String>,
);
static PRE_THREAD: std::sync::Mutex<Option<PreThread>> = std::sync::Mutex::new(None);

fn start_pre_threads(n: usize) {
    for i in 0..n {
        let builder = std::thread::Builder::new().name(format!("probe-idle-{i}"));
        if i == 0 {
            let (to_thread, commands) = std::sync::mpsc::channel::<Vec<String>>();
            let (answers, from_thread) = std::sync::mpsc::channel::<String>();
            let _ = builder.spawn(move || {
                while let Ok(words) = commands.recv() {
                    let words: Vec<&str> = words.iter().map(String::as_str).collect();
                    if answers.send(command(&words)).is_err() {
                        break;
                    }
                }
            });
            *PRE_THREAD.lock().unwrap_or_else(|e| e.into_inner()) = Some((to_thread, from_thread));
        } else {
            let _ = builder.spawn(|| loop {
                std::thread::park();
            });
        }
    }
}

fn on_pre_thread(words: &[&str]) -> String {
    let guard = PRE_THREAD.lock().unwrap_or_else(|e| e.into_inner());
    let Some((to, from)) = guard.as_ref() else {
        return "no --threads".into();
    };
    if to
        .send(words.iter().map(|w| w.to_string()).collect())
        .is_err()
    {
        return "pre-seal thread gone".into();
    }
    from.recv()
        .unwrap_or_else(|_| "pre-seal thread gone".into())
}

/// The tap queue fd opened before sealing (`--tap`), for `bench writev`.
static TAP_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// `bench getpid|fcntl|writev N`: mean nanoseconds per call over N calls.
fn bench(what: &str, n: u64) -> String {
    // A minimal frame behind a zeroed 12-byte vnet header.
    let mut frame = [0u8; 12 + 60];
    frame[12..18].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame[18..24].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame[24..26].copy_from_slice(&0x88b5u16.to_be_bytes());
    let iov = libc::iovec {
        iov_base: frame.as_mut_ptr().cast(),
        iov_len: frame.len(),
    };
    let fd = TAP_FD.load(std::sync::atomic::Ordering::Relaxed);
    if what == "writev" && fd < 0 {
        return "no --tap".into();
    }
    let start = std::time::Instant::now();
    for _ in 0..n {
        match what {
            // SAFETY: getpid takes no arguments.
            "getpid" => unsafe {
                libc::syscall(libc::SYS_getpid);
            },
            // An argument-filtered call: the kernel cannot cache its verdict, the BPF runs.
            // SAFETY: F_GETFD on stdin takes integers only.
            "fcntl" => unsafe {
                libc::fcntl(0, libc::F_GETFD);
            },
            // SAFETY: `iov` describes `frame`, which outlives the call; the kernel only reads.
            _ => unsafe {
                libc::writev(fd, &iov, 1);
            },
        }
    }
    format!("ns {}", start.elapsed().as_nanos() / u128::from(n.max(1)))
}

/// Runs one command; returns the answer line.
fn command(words: &[&str]) -> String {
    match words {
        ["bench", what, n] => bench(what, n.parse().unwrap_or(1)),
        ["pre", rest @ ..] => on_pre_thread(rest),
        ["open", path] => match std::fs::File::open(path) {
            Ok(_) => "ok".into(),
            Err(e) => errno_text(&e),
        },
        ["connect", path] => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => "ok".into(),
            Err(e) => errno_text(&e),
        },
        ["bind", path] => match std::os::unix::net::UnixListener::bind(path) {
            Ok(_) => {
                let _ = std::fs::remove_file(path);
                "ok".into()
            }
            Err(e) => errno_text(&e),
        },
        ["syscall", name, args @ ..] => {
            let Some(nr) = super::seccomp::syscall_number(name) else {
                return format!("unknown syscall {name}");
            };
            let mut a = [0i64; 6];
            for (slot, v) in a.iter_mut().zip(args) {
                *slot = v.parse().unwrap_or(0);
            }
            // SAFETY: the test asks only for calls that are harmless with these integer
            // arguments (null pointers make the kernel fail with EFAULT rather than write).
            let rc =
                unsafe { libc::syscall(nr as libc::c_long, a[0], a[1], a[2], a[3], a[4], a[5]) };
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if rc >= 0 && *name == "socket" {
                if let Ok(fd) = libc::c_int::try_from(rc) {
                    // SAFETY: closing the fd the call just returned.
                    unsafe { libc::close(fd) };
                }
            }
            if rc < 0 {
                format!("rc -1 err {e}")
            } else {
                format!("rc {rc}")
            }
        }
        ["thread", kind, rest @ ..] => {
            let kind = match *kind {
                "process" => ThreadKind::Process,
                "service" => ThreadKind::Service,
                "worker" => ThreadKind::Worker,
                "relay" => ThreadKind::Relay,
                "request" => ThreadKind::Request,
                "qmp" => ThreadKind::Qmp,
                other => return format!("unknown thread kind {other}"),
            };
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let t = std::thread::Builder::new()
                .name(format!("probe-{}", format!("{kind:?}").to_lowercase()))
                .spawn(move || {
                    if let Err(e) = super::enter_thread(kind) {
                        return format!("enter_thread: {e}");
                    }
                    let words: Vec<&str> = rest.iter().map(String::as_str).collect();
                    command(&words)
                });
            match t.map(|t| t.join()) {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => "thread panicked".into(),
                Err(e) => format!("spawn: {e}"),
            }
        }
        _ => format!("unknown command {words:?}"),
    }
}

/// `macvhost sandbox-probe`.
pub fn run(args: &ProbeArgs) -> ExitCode {
    if args.allowlist {
        print!("{}", allowlist_markdown());
        return ExitCode::SUCCESS;
    }
    // Kept open for the life of the probe.
    let _tap = match &args.tap {
        Some(name) => {
            let spec = crate::host::HostSpec::Tap {
                iface: name.clone(),
            };
            match crate::host::HostDevice::open(&spec, 1) {
                Ok(d) => {
                    use std::os::fd::AsRawFd;
                    TAP_FD.store(
                        d.queues()[0].as_raw_fd(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    Some(d)
                }
                Err(e) => {
                    eprintln!("macvhost sandbox-probe: --tap {name}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("macvhost sandbox-probe: {e}");
            return ExitCode::from(2);
        }
    };
    start_pre_threads(args.threads);
    let started = std::time::Instant::now();
    let sealed = match super::seal(&cfg) {
        Ok(s) => s,
        Err(e) => {
            println!("seal failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let took = started.elapsed();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "sealed pid {} fs {:?} threads {} bounding_kept {} landlock_abi {} took_us {}",
        std::process::id(),
        sealed.fs,
        sealed.other_threads,
        sealed.bounding_set_kept,
        sealed.landlock_abi,
        took.as_micros()
    );
    let _ = out.flush();
    drop(out);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words == ["exit"] {
            break;
        }
        let answer = command(&words);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}

/// The allowlists as Markdown: one row per syscall with a column per thread kind (`yes`, or
/// `args` when only some arguments pass) and the process filter's reason; then, per narrower
/// kind, the reasons that differ from it.
pub fn allowlist_markdown() -> String {
    let table = super::allowlist_table();
    let mut names: Vec<&str> = table.iter().map(|r| r.1).collect();
    names.sort_unstable();
    names.dedup();
    let find = |kind: ThreadKind, name: &str| table.iter().find(|r| r.0 == kind && r.1 == name);
    let mut out = String::from(
        "| syscall | process | service | worker | relay | request | qmp | why |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for name in &names {
        let cell =
            |kind: ThreadKind| find(kind, name).map_or("", |r| if r.3 { "args" } else { "yes" });
        let why = find(ThreadKind::Process, name).map_or("", |r| r.2);
        out.push_str(&format!(
            "| `{name}` | {} | {} | {} | {} | {} | {} | {why} |\n",
            cell(ThreadKind::Process),
            cell(ThreadKind::Service),
            cell(ThreadKind::Worker),
            cell(ThreadKind::Relay),
            cell(ThreadKind::Request),
            cell(ThreadKind::Qmp),
        ));
    }
    for kind in ThreadKind::NARROW {
        out.push_str(&format!(
            "\nWhy the {kind:?} filter keeps what it keeps (beyond the common set):\n\n"
        ));
        for name in &names {
            let (Some(r), Some(p)) = (find(kind, name), find(ThreadKind::Process, name)) else {
                continue;
            };
            if r.2 != p.2 {
                out.push_str(&format!("- `{name}`: {}\n", r.2));
            }
        }
    }
    out
}
