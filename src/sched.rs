//! A hint to the operating system's scheduler about which threads an answer does not wait on.
//!
//! Where the cores are shared, the acknowledgement's tail is mostly the wait for a core. The
//! delivery threads only move callbacks already stored, so they run as batch work: the same share
//! of the CPU (their nice value is kept), but a delivery thread that wakes up does not preempt the
//! thread running (an ingress worker answering, the spool writer committing); it waits for the
//! next tick instead. It needs no privilege; where the kernel refuses, the thread runs as before.

/// The calling thread runs as SCHED_BATCH, its nice value unchanged.
pub fn background() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid `sched_param`.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "SCHED_BATCH not set");
        }
    }
}
