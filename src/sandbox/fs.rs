//! The empty filesystem view: a mount namespace whose root is an empty tmpfs (the main thread
//! and its later threads), and Landlock (threads already running; the main thread when no
//! mount namespace can be made). See the module doc of [`super`] and `docs/security.md`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::caps;
use super::{DirUse, FsIsolation, FsView, SandboxConfig, SandboxError};

// ---------------------------------------------------------------------------------------------
// Landlock (uapi/linux/landlock.h)
// ---------------------------------------------------------------------------------------------

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;

const FS_REMOVE_FILE: u64 = 1 << 5;
const FS_MAKE_SOCK: u64 = 1 << 9;
const FS_REFER: u64 = 1 << 13;
const FS_TRUNCATE: u64 = 1 << 14;
const FS_IOCTL_DEV: u64 = 1 << 15;
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The kernel's Landlock ABI version (0: Landlock unavailable or disabled).
pub(super) fn landlock_abi() -> u32 {
    // SAFETY: with a null attribute and size 0, the VERSION flag only returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).unwrap_or(0)
}

/// Every filesystem right this ABI knows.
fn fs_rights(abi: u32) -> u64 {
    // ABI 1: the thirteen rights from EXECUTE (bit 0) to MAKE_SYM (bit 12).
    let mut all = (1u64 << 13) - 1;
    if abi >= 2 {
        all |= FS_REFER;
    }
    if abi >= 3 {
        all |= FS_TRUNCATE;
    }
    if abi >= 5 {
        all |= FS_IOCTL_DEV;
    }
    all
}

fn net_rights(abi: u32) -> u64 {
    if abi >= 4 {
        NET_BIND_TCP | NET_CONNECT_TCP
    } else {
        0
    }
}

fn scopes(abi: u32) -> u64 {
    if abi >= 6 {
        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    } else {
        0
    }
}

/// A Landlock ruleset fd, ready for `landlock_restrict_self`.
#[derive(Debug)]
pub(super) struct Ruleset(OwnedFd);

pub(super) fn raw_fd(r: &Ruleset) -> RawFd {
    r.0.as_raw_fd()
}

fn create_ruleset(attr: &RulesetAttr) -> Result<Ruleset, SandboxError> {
    // SAFETY: `attr` is a valid ruleset attribute of the size passed; the kernel only reads it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(SandboxError::step("landlock_create_ruleset")(
            io::Error::last_os_error(),
        ));
    }
    // Nonnegative here, and the kernel's fds are C ints.
    let fd = RawFd::try_from(fd)
        .map_err(|e| SandboxError::step("landlock_create_ruleset")(io::Error::other(e)))?;
    // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
    Ok(Ruleset(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn add_rule(rs: &Ruleset, dir: &Path, allowed: u64) -> Result<(), SandboxError> {
    let err = |e| SandboxError::Step {
        step: "landlock_add_rule",
        source: io::Error::other(format!(
            "{}: {}",
            dir.display(),
            io::Error::from_raw_os_error(e)
        )),
    };
    let c = cstr(dir).map_err(|_| err(libc::EINVAL))?;
    // SAFETY: `c` is NUL-terminated; O_PATH opens only a reference to the directory.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(err(io::Error::last_os_error().raw_os_error().unwrap_or(0)));
    }
    // SAFETY: a fresh fd, owned here and closed on drop.
    let dir_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = PathBeneathAttr {
        allowed_access: allowed,
        parent_fd: dir_fd.as_raw_fd(),
    };
    // SAFETY: `attr` is a valid path-beneath attribute; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            rs.0.as_raw_fd(),
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error().raw_os_error().unwrap_or(0)));
    }
    Ok(())
}

/// Rights the sealed main thread keeps beneath a directory it still uses.
fn dir_rights(u: DirUse) -> u64 {
    match u {
        // Connecting to a unix socket is no Landlock right before ABI 8.
        DirUse::Connect => 0,
        DirUse::Remove => FS_REMOVE_FILE,
        DirUse::Listen => FS_MAKE_SOCK | FS_REMOVE_FILE,
    }
}

/// A ruleset that handles every filesystem right (so denies all of them), TCP bind/connect and
/// the scopes, with rights beneath `dirs`.
pub(super) fn landlock_ruleset(
    abi: u32,
    dirs: &[(PathBuf, DirUse)],
) -> Result<Ruleset, SandboxError> {
    if abi == 0 {
        return Err(SandboxError::step("landlock")(
            io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        ));
    }
    let handled = fs_rights(abi);
    let rs = create_ruleset(&RulesetAttr {
        handled_access_fs: handled,
        handled_access_net: net_rights(abi),
        scoped: scopes(abi),
    })?;
    for (dir, u) in dirs {
        let rights = dir_rights(*u) & handled;
        if rights != 0 {
            add_rule(&rs, dir, rights)?;
        }
    }
    Ok(rs)
}

/// A ruleset with no filesystem rule (the mount namespace hides the filesystem), denying TCP
/// bind/connect and scoping abstract unix sockets and signals. `None` before ABI 4.
pub(super) fn landlock_scopes_ruleset(abi: u32) -> Result<Option<Ruleset>, SandboxError> {
    if abi < 4 {
        return Ok(None);
    }
    create_ruleset(&RulesetAttr {
        handled_access_fs: 0,
        handled_access_net: net_rights(abi),
        scoped: scopes(abi),
    })
    .map(Some)
}

/// `landlock_restrict_self`. Async-signal-safe.
pub(super) fn raw_restrict_self(fd: RawFd) -> caps::Raw {
    // SAFETY: integer arguments; the kernel checks that `fd` is a ruleset.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
    if rc != 0 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(())
}

pub(super) fn restrict_self(rs: &Ruleset) -> Result<(), SandboxError> {
    raw_restrict_self(raw_fd(rs))
        .map_err(|e| SandboxError::step("landlock_restrict_self")(io::Error::from_raw_os_error(e)))
}

// ---------------------------------------------------------------------------------------------
// Mount namespace with an empty root
// ---------------------------------------------------------------------------------------------

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn os_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn check(rc: libc::c_long, what: impl std::fmt::Display) -> Result<libc::c_long, String> {
    if rc < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

/// The directories to bind into the empty root: canonical, nested ones merged into their
/// ancestor (which keeps the strongest use).
fn bind_dirs(dirs: &[(PathBuf, DirUse)]) -> Result<Vec<(PathBuf, DirUse)>, String> {
    let mut canon: Vec<(PathBuf, DirUse)> = Vec::new();
    for (d, u) in dirs {
        let c = std::fs::canonicalize(d).map_err(os_err(d.display()))?;
        canon.push((c, *u));
    }
    canon.sort();
    let mut out: Vec<(PathBuf, DirUse)> = Vec::new();
    for (d, u) in canon {
        if let Some(parent) = out.iter_mut().find(|(p, _)| d.starts_with(p)) {
            parent.1 = parent.1.max(u);
        } else {
            out.push((d, u));
        }
    }
    Ok(out)
}

fn write_proc(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(os_err(path))
}

/// Moves the calling thread into a new mount namespace whose root is an empty tmpfs holding
/// only `config.dirs` (bind mounts at their own paths) and the current directory's path. With `user_ns`, a user namespace is made first (mapping our own
/// uid and gid) for the privilege to do so.
fn enter_empty_root(config: &SandboxConfig, user_ns: bool) -> Result<(), String> {
    let dirs = bind_dirs(&config.dirs)?;
    let cwd = std::env::current_dir().ok();
    // SAFETY: getuid/getgid take no arguments.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let flags = libc::CLONE_NEWNS | if user_ns { libc::CLONE_NEWUSER } else { 0 };
    // SAFETY: integer flags; affects only the calling thread's namespaces.
    let rc = unsafe { libc::unshare(flags) };
    check(rc.into(), "unshare")?;
    if user_ns {
        write_proc("/proc/self/setgroups", "deny")?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    }
    // Nothing we mount may propagate back to the host.
    // SAFETY: null source/fstype/data with MS_REC|MS_PRIVATE only changes propagation.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check(rc.into(), "make / private")?;
    // Detached copies of the directories, taken before anything covers them.
    let mut clones = Vec::new();
    for (d, u) in &dirs {
        let c = cstr(d).map_err(os_err(d.display()))?;
        let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as u32;
        // SAFETY: `c` is NUL-terminated; the call returns a new fd for a detached mount tree.
        let rc = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
        let fd = check(rc, format!("open_tree {}", d.display()))?;
        let fd = RawFd::try_from(fd).map_err(|e| format!("open_tree {}: {e}", d.display()))?;
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
        if *u == DirUse::Connect {
            // Connecting to a socket needs no write access to its mount.
            set |= MOUNT_ATTR_RDONLY;
        }
        let attr = MountAttr {
            attr_set: set,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: `attr` is valid for the size passed; "" with AT_EMPTY_PATH names `fd`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                fd.as_raw_fd(),
                c"".as_ptr(),
                (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        check(rc, format!("mount_setattr {}", d.display()))?;
        clones.push((d.clone(), fd));
    }
    // The new root, staged on /tmp (any directory would do; the host's stays untouched).
    let staging = Path::new("/tmp");
    // SAFETY: NUL-terminated strings; mounts a fresh tmpfs in our own namespace.
    let rc = unsafe {
        libc::mount(
            c"macvhost-root".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0755,size=1m,nr_inodes=1024".as_ptr().cast(),
        )
    };
    check(rc.into(), "mount tmpfs")?;
    let inside = |p: &Path| staging.join(p.strip_prefix("/").unwrap_or(p));
    // Scaffolding first, binds after, so no directory is ever made inside a bound host dir.
    if let Some(cwd) = &cwd {
        std::fs::create_dir_all(inside(cwd)).map_err(os_err("mkdir cwd"))?;
    }
    for (d, _) in &clones {
        std::fs::create_dir_all(inside(d)).map_err(os_err(d.display()))?;
    }
    for (d, fd) in &clones {
        let to = cstr(&inside(d)).map_err(os_err(d.display()))?;
        // SAFETY: `fd` is a detached mount; "" with F_EMPTY_PATH names it; `to` is
        // NUL-terminated.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        check(rc, format!("move_mount {}", d.display()))?;
    }
    std::env::set_current_dir(staging).map_err(os_err("chdir"))?;
    // pivot_root(".", "."): the tmpfs becomes the root, the old root is stacked beneath it and
    // detached at once (no put_old directory needed).
    // SAFETY: NUL-terminated strings.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(rc, "pivot_root")?;
    // SAFETY: NUL-terminated string; detaches the old root from this namespace.
    let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(rc.into(), "umount old root")?;
    std::env::set_current_dir("/").map_err(os_err("chdir /"))?;
    if let Some(cwd) = &cwd {
        // Relative --socket-path and --control-socket keep resolving as before.
        let _ = std::env::set_current_dir(cwd);
    }
    Ok(())
}

/// Hides the filesystem from the calling (main) thread, as `config.fs` asks. `single_threaded`:
/// no other thread runs (a user namespace can only be entered then).
pub(super) fn isolate_main(
    config: &SandboxConfig,
    single_threaded: bool,
    abi: u32,
) -> Result<FsView, SandboxError> {
    let mount_ns = || -> Result<FsView, String> {
        let admin = caps::current()
            .map_err(|e| e.to_string())?
            .has(caps::CAP_SYS_ADMIN);
        if !admin && !single_threaded {
            return Err(
                "no CAP_SYS_ADMIN, and a user namespace needs a single-threaded \
                        process"
                    .into(),
            );
        }
        enter_empty_root(config, !admin)?;
        Ok(FsView::MountNamespace { user_ns: !admin })
    };
    let landlock = || -> Result<FsView, String> {
        if abi == 0 {
            return Err("not available in this kernel (or not enabled at boot)".into());
        }
        Ok(FsView::Landlock { abi })
    };
    match config.fs {
        FsIsolation::Landlock => landlock().map_err(|landlock| SandboxError::NoFsIsolation {
            mount_ns: "not tried".into(),
            landlock,
        }),
        FsIsolation::MountNamespace => mount_ns().map_err(|mount_ns| SandboxError::NoFsIsolation {
            mount_ns,
            landlock: "not tried".into(),
        }),
        FsIsolation::Auto => match mount_ns() {
            Ok(v) => Ok(v),
            Err(mount_ns) => match landlock() {
                Ok(v) => {
                    tracing::warn!(
                        "no mount namespace ({mount_ns}): hiding the filesystem with Landlock \
                         instead (paths of unix sockets stay reachable)"
                    );
                    Ok(v)
                }
                Err(landlock) => Err(SandboxError::NoFsIsolation { mount_ns, landlock }),
            },
        },
    }
}
