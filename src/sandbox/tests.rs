//! Unit tests of the allowlists and helpers. The sealing itself is tested on a separate
//! process (`tests/sandbox.rs` drives `macvhost sandbox-probe`), since it cannot be undone.

use super::filters::{allowlist, Cond, Opts};
use super::*;

fn opts() -> Opts {
    Opts {
        pid: std::process::id(),
        helper_pid: Some(1),
    }
}

/// Syscalls that would undo the sandbox or reach outside it: no thread may ever make them.
const NEVER: &[&str] = &[
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "kexec_load",
    "init_module",
    "finit_module",
    "delete_module",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "kill",
    "capset",
    "setuid",
    "setresuid",
    "setgid",
    "setresgid",
    "setgroups",
    "socketcall",
    "memfd_create",
    "mknodat",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsmount",
    "pidfd_open",
    "pidfd_getfd",
    "landlock_create_ruleset",
    "landlock_add_rule",
];

#[test]
fn no_allowlist_contains_a_syscall_that_undoes_the_sandbox() {
    for kind in ThreadKind::ALL {
        for e in allowlist(kind, &opts()) {
            assert!(!NEVER.contains(&e.name), "{kind:?} allows {}", e.name);
        }
    }
}

#[test]
fn every_allowed_syscall_has_a_name_a_reason_and_a_number_that_matches() {
    for kind in ThreadKind::ALL {
        for e in allowlist(kind, &opts()) {
            assert!(!e.why.is_empty(), "{kind:?} {}", e.name);
            assert_eq!(syscall_name(e.nr), Some(e.name), "{kind:?} nr {}", e.nr);
        }
    }
}

#[test]
fn narrow_filters_allow_nothing_the_process_filter_denies() {
    // A narrower filter is stacked on the process filter: an entry the process filter lacks
    // would be dead (and would hide a missing entry there).
    let process: Vec<_> = allowlist(ThreadKind::Process, &opts());
    for kind in ThreadKind::NARROW {
        for e in allowlist(kind, &opts()) {
            assert!(
                process.iter().any(|p| p.nr == e.nr),
                "{kind:?} allows {} but the process filter does not",
                e.name
            );
        }
    }
}

#[test]
fn no_allowlist_lets_io_uring_bypass_seccomp() {
    // Operations submitted to a ring are never seen by seccomp: a ring in the sealed process
    // would reopen every syscall the filters close.
    for kind in ThreadKind::ALL {
        let list = allowlist(kind, &opts());
        assert!(
            !list.iter().any(|e| e.name.starts_with("io_uring")),
            "{kind:?}"
        );
    }
}

#[test]
fn workers_cannot_open_connect_or_spawn() {
    let w = allowlist(ThreadKind::Worker, &opts());
    for name in [
        "socket", "connect", "bind", "accept4", "openat", "clone", "clone3", "sendmsg", "mkdirat",
        "unlinkat",
    ] {
        assert!(!w.iter().any(|e| e.name == name), "worker allows {name}");
    }
    let s = allowlist(ThreadKind::Service, &opts());
    for name in ["socket", "connect", "bind", "openat", "clone", "mmap_exec"] {
        assert!(!s.iter().any(|e| e.name == name), "service allows {name}");
    }
}

#[test]
fn calls_that_multiplex_many_operations_are_always_argument_filtered() {
    // One allowed number would open every operation behind it (any ioctl of any fd, fcntl's
    // F_SETOWN, prctl's PR_SET_SECCOMP mode 1, fork-style clone, any socket family).
    for kind in ThreadKind::ALL {
        for e in allowlist(kind, &opts()) {
            if [
                "ioctl", "fcntl", "prctl", "clone", "socket", "tgkill", "seccomp", "wait4",
            ]
            .contains(&e.name)
            {
                assert!(!e.when.is_empty(), "{kind:?} allows every {}", e.name);
            }
        }
    }
}

#[test]
fn no_thread_may_open_a_file_once_sealed() {
    // Everything is opened at start-up; the shim's rendezvous is an abstract socket.
    for kind in ThreadKind::ALL {
        for e in allowlist(kind, &opts()) {
            for name in [
                "open", "openat", "openat2", "creat", "mkdir", "mkdirat", "mknod",
            ] {
                assert_ne!(e.name, name, "{kind:?}");
            }
        }
    }
}

#[test]
fn memory_can_never_be_made_executable() {
    for kind in ThreadKind::ALL {
        for e in allowlist(kind, &opts()) {
            if e.name == "mmap" || e.name == "mprotect" {
                assert_eq!(
                    e.when,
                    vec![vec![Cond::MaskClear(2, libc::PROT_EXEC as u64)]],
                    "{kind:?} {}",
                    e.name
                );
            }
            assert_ne!(e.name, "pkey_mprotect", "{kind:?}");
        }
    }
}

#[test]
fn sockets_are_unix_only_and_clone_makes_threads_only() {
    let p = allowlist(ThreadKind::Process, &opts());
    let get = |n: &str| p.iter().find(|e| e.name == n).unwrap().when.clone();
    assert_eq!(get("socket"), vec![vec![Cond::Eq(0, libc::AF_UNIX as u64)]]);
    assert_eq!(
        get("clone"),
        vec![vec![Cond::MaskSet(0, libc::CLONE_THREAD as u64)]]
    );
    assert_eq!(
        get("tgkill"),
        vec![vec![Cond::Eq(0, u64::from(std::process::id()))]]
    );
}

#[test]
fn security_doc_lists_every_allowed_syscall() {
    let doc = include_str!("../../docs/security.md");
    for (kind, name, _, _) in allowlist_table() {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/security.md does not mention `{name}` ({kind:?})"
        );
    }
}

#[test]
fn seccomp_mode_parses_enforce_and_log_only() {
    assert_eq!("enforce".parse::<SeccompMode>(), Ok(SeccompMode::Enforce));
    assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
    assert!("off".parse::<SeccompMode>().is_err());
}

#[test]
fn enter_thread_without_a_seal_changes_nothing() {
    // The unit-test process is never sealed: enter_thread must be a no-op (the lead's hook in
    // the worker runs in in-process tests too).
    enter_thread(ThreadKind::Worker).unwrap();
    // SAFETY: prctl with integer arguments only.
    assert_eq!(unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) }, 0);
}

#[test]
fn no_thread_may_change_owner_or_mode_once_sealed() {
    // The socket keeps the owner and mode set at start-up (it is moved aside on link loss,
    // never bound again): a sealed process has no reason to chown or chmod anything.
    for kind in ThreadKind::ALL {
        for e in allowlist(kind, &opts()) {
            for name in [
                "chmod",
                "fchmod",
                "fchmodat",
                "fchmodat2",
                "chown",
                "fchown",
                "lchown",
                "fchownat",
            ] {
                assert_ne!(e.name, name, "{kind:?}");
            }
        }
    }
}
