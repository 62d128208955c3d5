//! The workspace's two foreign calls, behind safe functions: handing the system back memory
//! the allocator holds free, and keeping a background thread from pre-empting the one that
//! serves requests. (The crate is named for the first.)
//!
//! Memory:
//! Loading a policy set builds Cedar's parse trees, validates, and keeps only the compiled
//! policies: the temporaries are freed, but glibc returns memory to the system only from the
//! top of its heap, and the policies kept sit above most of what was freed. The freed pages
//! stay resident for the life of the process: a 10,000-policy set left 117 MiB resident where
//! 64 MiB was needed, a 1,000-policy set 20 MiB where 14 was (idle RSS of the dist build).
//!
//! Scheduling: the audit writer wakes once per group commit (up to a thousand times a second
//! under load). On a sidecar given one core, a normal thread that wakes pre-empts the serving
//! thread on the spot, in the middle of a request; as a batch thread it runs when the serving
//! thread waits or its time slice ends instead (see [`run_as_batch`]).
//!
//! The workspace forbids unsafe code; this crate holds the foreign calls that need it.

/// Asks glibc to return the free pages of every arena (`malloc_trim(0)`). Call it where a
/// burst of allocation has just ended and nothing latency-sensitive runs (the proxy: before
/// it reports ready, and after each policy reload). It walks and locks each arena in turn, a
/// few milliseconds for a large heap. Does nothing where the allocator is not glibc's.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `malloc_trim` takes no pointers and touches only glibc's own free lists, which
    // it locks while it works; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Puts the calling thread in the `SCHED_BATCH` scheduling class (Linux): it keeps its fair
/// share of the CPU, but waking up it does not pre-empt the thread that is running. For a
/// thread whose work may wait a few milliseconds for the CPU (the audit writer) and must not
/// cut into the request being served. Any thread may lower its own class; this needs no
/// privilege. Where the call is not available it does nothing and succeeds.
///
/// # Errors
/// The system's refusal (a seccomp profile that denies `sched_setscheduler`, say).
pub fn run_as_batch() -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let param = libc::sched_param { sched_priority: 0 };
        #[allow(unsafe_code)]
        // SAFETY: `sched_setscheduler` reads `param`, which lives across the call, and changes
        // only the scheduling class of the calling thread (pid 0); it keeps no pointer.
        let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The calling thread (a test's own) ends up in the batch class, as the kernel reports it
    /// (`/proc/thread-self/stat`, field 41: the policy, 3 for `SCHED_BATCH`).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_thread_can_lower_itself_to_the_batch_class() {
        let policy = || {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            // Fields after the command name (which may hold spaces) start at field 3.
            let after_name = &stat[stat.rfind(')').unwrap() + 1..];
            after_name
                .split_whitespace()
                .nth(41 - 3)
                .unwrap()
                .to_owned()
        };
        std::thread::spawn(move || {
            assert_eq!(policy(), "0", "a new thread starts in the normal class");
            super::run_as_batch().unwrap();
            assert_eq!(policy(), "3");
        })
        .join()
        .unwrap();
    }
}
