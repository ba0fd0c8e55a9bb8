//! Hints to the operating system's scheduler about which threads an answer waits on.
//!
//! Where the cores are shared, the acknowledgement's tail is mostly the wait for a core. The
//! delivery threads only move callbacks already stored, so they run as batch work: the same share
//! of the CPU (their nice value is kept), but a delivery thread that wakes up does not preempt the
//! thread running (an ingress worker answering, the spool writer committing); it waits for the
//! next tick instead. The threads an answer waits on — the ingress workers and the spool writer —
//! ask for a short time slice: their share of the CPU is unchanged, but when one wakes up it is
//! run sooner, for a shorter turn. Neither needs a privilege; where the kernel refuses (or, for
//! the slice, predates Linux 6.12), the thread runs as before.

/// The calling thread runs as SCHED_BATCH, its nice value unchanged — if it ran as SCHED_OTHER;
/// a policy an operator chose (`chrt`) is left as it is.
pub fn background() {
    #[cfg(target_os = "linux")]
    {
        if policy() != libc::SCHED_OTHER {
            return;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid `sched_param`.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "SCHED_BATCH not set");
        }
    }
}

/// The time slice the threads an answer waits on ask for: the shortest the kernel grants.
#[cfg(target_os = "linux")]
const PROMPT_SLICE_NS: u64 = 100_000;

/// The calling thread asks for a short time slice (EEVDF's `sched_runtime`), its policy and nice
/// value unchanged. A thread given a policy other than SCHED_OTHER or SCHED_BATCH (say, a
/// real-time one by `chrt`) is left as it is.
pub fn prompt() {
    #[cfg(target_os = "linux")]
    if let Err(e) = set_slice(PROMPT_SLICE_NS) {
        tracing::debug!(error = %e, "short time slice not set");
    }
}

/// Asks for a time slice of `ns` for the calling thread, at its policy and nice value; where the
/// policy is not one of the kernel's fair ones, nothing is changed and that is the error.
#[cfg(target_os = "linux")]
fn set_slice(ns: u64) -> std::io::Result<()> {
    /// `struct sched_attr` as `sched_setattr(2)` takes it (its first version, 48 bytes).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    let policy = policy();
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Err(std::io::Error::other(format!(
            "scheduling policy {policy} left as it is"
        )));
    }
    let nice = nice();
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: policy as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: ns,
        deadline: 0,
        period: 0,
    };
    // SAFETY: pid 0 is the calling thread; `attr` is a valid `sched_attr` of the size it says.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's scheduling policy (without the reset-on-fork flag).
#[cfg(target_os = "linux")]
fn policy() -> i32 {
    // SAFETY: pid 0 is the calling thread.
    unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
}

/// The calling thread's nice value. (It cannot fail for the calling thread, so the -1 of an
/// error is not told apart from a nice value of -1.)
#[cfg(target_os = "linux")]
fn nice() -> i32 {
    // SAFETY: PRIO_PROCESS 0 is the calling thread on Linux.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's time slice in ns, as the kernel reports it (Linux 6.6 and later).
    fn slice() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.split(':').nth(1)?.trim().parse().ok()
    }

    #[test]
    fn the_hints_keep_a_threads_nice_value_and_policy_and_the_slice_is_what_was_asked() {
        std::thread::spawn(|| {
            // An operator's `nice` (raising it needs no privilege) survives both hints.
            // SAFETY: PRIO_PROCESS 0 is the calling thread on Linux.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            let granted = set_slice(PROMPT_SLICE_NS).is_ok();
            assert_eq!((nice(), policy()), (3, libc::SCHED_OTHER));
            if granted {
                if let Some(ns) = slice() {
                    assert_eq!(ns, PROMPT_SLICE_NS);
                }
            }
            background();
            assert_eq!(nice(), 3);
            let batch = policy() == libc::SCHED_BATCH;
            // A batch thread asking for a slice stays a batch thread.
            let _ = set_slice(PROMPT_SLICE_NS);
            assert_eq!(nice(), 3);
            if batch {
                assert_eq!(policy(), libc::SCHED_BATCH);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_policy_given_to_the_process_is_left_as_it_is() {
        std::thread::spawn(|| {
            // SCHED_IDLE needs no privilege to enter; an operator's `chrt -i` gives it.
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread; `param` is a valid `sched_param`.
            assert_eq!(
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) },
                0
            );
            background();
            assert_eq!(policy(), libc::SCHED_IDLE);
            assert!(set_slice(PROMPT_SLICE_NS).is_err());
            prompt();
            assert_eq!(policy(), libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
    }
}
