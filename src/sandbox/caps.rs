//! Capabilities and ids of the calling thread, through raw syscalls.
//!
//! Everything named `raw_*` is async-signal-safe (one or a few syscalls, no allocation, no
//! locks): [`super::threads`] runs it inside a signal handler on other threads.

use std::io;

use super::SandboxError;

pub(super) const CAP_SETGID: u32 = 6;
pub(super) const CAP_SETUID: u32 = 7;
pub(super) const CAP_SYS_ADMIN: u32 = 21;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's three capability sets, 64 bits each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

impl CapSets {
    pub fn has(&self, cap: u32) -> bool {
        self.effective & (1u64 << cap) != 0
    }
}

/// `capget` for the calling thread.
pub(super) fn current() -> Result<CapSets, SandboxError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: `hdr` and `data` are valid for the kernel to read and write (version 3 takes two
    // data elements); both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(SandboxError::step("capget")(io::Error::last_os_error()));
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(CapSets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`, or probed
/// with `PR_CAPBSET_READ` when /proc is not there).
pub(super) fn last_cap() -> Result<u32, SandboxError> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap") {
        if let Ok(n) = s.trim().parse::<u32>() {
            if n < 64 {
                return Ok(n);
            }
        }
    }
    let mut n = 0u32;
    // PR_CAPBSET_READ fails with EINVAL past the last capability.
    // SAFETY: prctl with integer arguments only.
    while n < 63 && unsafe { libc::prctl(libc::PR_CAPBSET_READ, n + 1, 0, 0, 0) } >= 0 {
        n += 1;
    }
    Ok(n)
}

/// Result of a raw step: the errno on failure.
pub(super) type Raw = Result<(), i32>;

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(rc: libc::c_long) -> Raw {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Empties the bounding set. `Ok(true)`: it was kept because the thread lacks `CAP_SETPCAP`
/// (EPERM on the first drop of a capability still in the set).
pub(super) fn raw_drop_bounding(last_cap: u32) -> Result<bool, i32> {
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present <= 0 {
            continue;
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return match errno() {
                libc::EPERM => Ok(true),
                e => Err(e),
            };
        }
    }
    Ok(false)
}

/// Clears the ambient set.
pub(super) fn raw_clear_ambient() -> Raw {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // EINVAL: a kernel without ambient capabilities (before 4.3) has nothing to clear.
    match check(rc.into()) {
        Err(libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// Sets the thread's groups to `[gid]`, then its gids and uids (raw syscalls: this thread
/// only, unlike the glibc wrappers).
pub(super) fn raw_set_ids(uid: u32, gid: u32) -> Raw {
    let groups = [gid];
    // SAFETY: `groups` holds one gid and outlives the call; the kernel only reads it.
    check(unsafe { libc::syscall(libc::SYS_setgroups, 1usize, groups.as_ptr()) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })
}

/// Empties the effective, permitted and inheritable sets.
pub(super) fn raw_capset_zero() -> Raw {
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: `hdr` and `data` are valid for reads (version 3 takes two data elements) and
    // outlive the call.
    check(unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) })
}

/// Keeps `cap` alone in the effective and permitted sets (the link helper).
pub(super) fn raw_keep_only(cap: u32) -> Raw {
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    let (i, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
    data[i].effective = bit;
    data[i].permitted = bit;
    // SAFETY: as in `raw_capset_zero`.
    check(unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) })
}

/// `PR_SET_NO_NEW_PRIVS`.
pub(super) fn raw_no_new_privs() -> Raw {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
}

/// `PR_SET_DUMPABLE 0` (process-wide): no core file of guest memory, and same-uid processes
/// can no longer ptrace us or read `/proc/PID/mem`.
pub(super) fn set_not_dumpable() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }.into())
        .map_err(|e| SandboxError::step("PR_SET_DUMPABLE")(io::Error::from_raw_os_error(e)))
}

/// Reads back what the calling thread now holds: no capability in any set (the bounding set
/// only when `bounding_dropped`), and `no_new_privs`.
pub(super) fn verify_current_thread(bounding_dropped: bool) -> Result<(), SandboxError> {
    let fail = |what: String| SandboxError::Step {
        step: "verify",
        source: io::Error::other(what),
    };
    let c = current()?;
    if c.effective | c.permitted | c.inheritable != 0 {
        return Err(fail(format!("capabilities still held: {c:?}")));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        return Err(fail("no_new_privs is not set".into()));
    }
    for cap in 0..=last_cap()? {
        // SAFETY: prctl with integer arguments only.
        let ambient =
            unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap, 0, 0) };
        if ambient > 0 {
            return Err(fail(format!("ambient capability {cap} still set")));
        }
        // SAFETY: prctl with integer arguments only.
        if bounding_dropped && unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } > 0 {
            return Err(fail(format!("capability {cap} still in the bounding set")));
        }
    }
    Ok(())
}
