//! Small operating-system pieces: the process footprint, the SIGTERM flag, durable syncs, pids, random names.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static SIGTERM: AtomicBool = AtomicBool::new(false);
static STEPPED: AtomicBool = AtomicBool::new(false);
const EARLY_EXIT: &[u8] = b"[mlxsup-worker] worker_exit reason=sigterm before the first step: nothing newer than the checkpoint loaded\n";

extern "C" fn on_sigterm(_: libc::c_int) {
    SIGTERM.store(true, Ordering::SeqCst); // only a flag: the step boundary does the work
    if !STEPPED.load(Ordering::SeqCst) {
        // PROTOCOL.md 8: no step boundary yet, so nothing to save: leave at once, without a goodbye.
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is a static.
        unsafe {
            libc::write(2, EARLY_EXIT.as_ptr().cast(), EARLY_EXIT.len());
            libc::_exit(crate::protocol::EXIT_CHECKPOINTED);
        }
    }
}

/// A step boundary was reached: from now on SIGTERM is acted on at the next one (before it, SIGTERM ends the
/// process at once with status 75: it has nothing newer than the checkpoint it loaded).
pub fn mark_stepped() {
    STEPPED.store(true, Ordering::SeqCst);
}

/// Catch SIGTERM from now on; [`sigterm_received`] tells whether it came. Before the first step boundary
/// ([`mark_stepped`]) it ends the process at once with status 75.
pub fn install_sigterm_handler() {
    let handler: extern "C" fn(libc::c_int) = on_sigterm;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Whether SIGTERM arrived since [`install_sigterm_handler`].
pub fn sigterm_received() -> bool {
    SIGTERM.load(Ordering::SeqCst)
}

/// This process's footprint in bytes: resident set on Linux, `phys_footprint` on macOS; 0 when unknown.
pub fn footprint() -> u64 {
    platform_footprint().unwrap_or(0)
}

#[cfg(target_os = "linux")]
fn platform_footprint() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(target_os = "macos")]
fn platform_footprint() -> Option<u64> {
    // SAFETY: rusage_info_v2 is plain data; proc_pid_rusage fills it for our own pid.
    unsafe {
        let mut info: libc::rusage_info_v2 = std::mem::zeroed();
        let buffer = &mut info as *mut libc::rusage_info_v2 as *mut libc::rusage_info_t;
        if libc::proc_pid_rusage(libc::getpid(), libc::RUSAGE_INFO_V2, buffer) == 0 {
            Some(info.ri_phys_footprint)
        } else {
            None
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn platform_footprint() -> Option<u64> {
    None
}

/// Make a file's (or a directory's) contents durable: `F_FULLFSYNC` on macOS (plain fsync does not flush
/// the drive's cache there), falling back to `fsync` where the file system refuses it; `fsync` elsewhere.
pub fn durable(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    #[cfg(target_os = "macos")]
    {
        // SAFETY: fd is open for the lifetime of `file`.
        if unsafe { libc::fcntl(fd, libc::F_FULLFSYNC) } == 0 {
            return Ok(());
        }
    }
    // SAFETY: fd is open for the lifetime of `file`.
    if unsafe { libc::fsync(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Make a directory's entries (new files, renames) durable.
pub fn durable_dir(path: &Path) -> io::Result<()> {
    durable(&File::open(path)?)
}

/// Whether another live process has this pid (our own counts as dead: its scratch is a predecessor's).
pub fn pid_alive(pid: i64) -> bool {
    let pid = match libc::pid_t::try_from(pid) {
        Ok(pid) if pid > 0 && pid as u32 != std::process::id() => pid,
        _ => return false,
    };
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Eight random hex digits for scratch names (from /dev/urandom; the clock if that fails).
pub fn random_hex8() -> String {
    let mut bytes = [0u8; 4];
    let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        bytes = (nanos ^ std::process::id()).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Wall clock in seconds since the Unix epoch.
pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
