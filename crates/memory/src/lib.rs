//! The process's allocator, and the workspace's foreign calls behind safe functions: handing
//! the system back memory the allocators hold free, keeping a background thread from
//! pre-empting the one that serves requests, and socket I/O. (The crate is named for the
//! first two.)
//!
//! Allocator: every binary that links this crate (the proxy's does) allocates with jemalloc
//! on Linux with glibc. A request allocates a dozen times, some of it over 1 KiB (the
//! pipeline's future, buffers), which glibc serves from its slow paths and pays for with a
//! consolidation of its fast bins; jemalloc serves all of it from per-thread caches. In a
//! profile of the request path at 1,000 policies, allocation went from ~0.7 µs a request
//! (glibc's `malloc`, `_int_malloc`, `_int_free`, `malloc_consolidate`) to ~0.2. C code keeps
//! glibc's `malloc` (the symbols are prefixed): aws-lc's handshake state, mostly.
//!
//! Memory handed back: loading a policy set builds Cedar's parse trees, validates, and keeps
//! only the compiled policies. The temporaries are freed, but neither allocator hands the
//! pages back at once: glibc returns memory only from the top of its heap, where the policies
//! kept sit above most of what was freed, and jemalloc decays unused pages over ten seconds,
//! counted only while the process allocates, so an idle sidecar would keep them for its life.
//! Left alone, a 10,000-policy set kept 117 MiB resident where 64 MiB was needed (glibc) and
//! 128 MiB where 57 was (jemalloc); see [`release_freed`].
//!
//! Scheduling: the audit writer wakes once per group commit (up to a thousand times a second
//! under load). On a sidecar given one core, a normal thread that wakes pre-empts the serving
//! thread on the spot, in the middle of a request; as a batch thread it runs when the serving
//! thread waits or its time slice ends instead (see [`run_as_batch`]).
//!
//! Sockets: [`socket`] reads and writes a connection without glibc's cancellation points.
//!
//! Time: [`clock::coarse_now`] reads the monotonic clock as of the kernel's last tick, for
//! deadlines of seconds stamped on every request.
//!
//! The workspace forbids unsafe code; this crate holds the foreign calls that need it.

pub mod clock;
#[cfg(unix)]
pub mod socket;

/// Not in cargo-fuzz builds (`cfg(fuzzing)`): the sanitizers there track the heap through the
/// system allocator, which they intercept.
#[cfg(all(target_os = "linux", target_env = "gnu", not(fuzzing)))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it starts (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them). Tuned for the request path, where every request allocates and frees an
/// 8 KiB read buffer (hyper's), and a few more of several KiB:
/// - `slab_sizes:4097-14336:16`: small size classes above 4 KiB come from 64 KiB slabs
///   (several regions each) instead of slabs the size of one or two regions, which emptied and
///   were handed back to the page allocator, then taken again, on most requests;
/// - `tcache_gc_incr_bytes:1048576`: the thread cache's garbage collection runs once per MiB
///   allocated instead of per 64 KiB, every few requests, when it flushed the cached buffers
///   back to their slabs.
///
/// Counted under callgrind (`benches/instructions/run.sh`), the allocator's share of the serving
/// thread's work went from ~3,100 instructions a request to ~1,600.
#[cfg(all(target_os = "linux", target_env = "gnu", not(fuzzing)))]
#[allow(unsafe_code)]
// SAFETY: jemalloc reads this symbol as `const char *malloc_conf` (the embedded build's
// `_rjem_` prefix): one pointer to a NUL-terminated string with static lifetime, never written.
#[unsafe(export_name = "_rjem_malloc_conf")]
#[used]
static MALLOC_CONF: MallocConf = MallocConf(JEMALLOC_OPTIONS.as_ptr());

/// The options [`MALLOC_CONF`] points at.
#[cfg(all(target_os = "linux", target_env = "gnu", not(fuzzing)))]
const JEMALLOC_OPTIONS: &std::ffi::CStr = c"slab_sizes:4097-14336:16,tcache_gc_incr_bytes:1048576";

/// A C string pointer that can be a `static`: it points at a constant.
#[cfg(all(target_os = "linux", target_env = "gnu", not(fuzzing)))]
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

#[cfg(all(target_os = "linux", target_env = "gnu", not(fuzzing)))]
#[allow(unsafe_code)]
// SAFETY: the pointer is to a constant string, read by any thread, written by none.
unsafe impl Sync for MallocConf {}

/// Hands the system back the pages both allocators hold free: jemalloc's unused pages in
/// every arena (`arena.<all>.purge`, at once rather than over its decay time), after the
/// calling thread's cache of freed blocks is handed back to their pages (`thread.tcache.flush`:
/// a cached block keeps its page in use: 0.7-0.8 MiB after loading 10 or 10,000 policies), and glibc's
/// free pages (`malloc_trim(0)`, for what C code allocated). Call it where a burst of
/// allocation has just ended and nothing latency-sensitive runs (the proxy: before it reports
/// ready, and after each policy reload); it walks and locks each arena in turn, a few
/// milliseconds for a large heap. Elsewhere than Linux with glibc it does nothing.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // A thread without a cache (`tcache:false` in `_RJEM_MALLOC_CONF`) has nothing to
        // flush, and jemalloc says so with an error: only the purge's result is checked.
        let _ = mallctl_run(c"thread.tcache.flush");
        // `MALLCTL_ARENAS_ALL` (4096) names every arena.
        let result = mallctl_run(c"arena.4096.purge");
        // Only a misspelt name fails (the test below calls it).
        debug_assert_eq!(result, 0, "jemalloc refused arena.4096.purge");
        #[allow(unsafe_code)]
        // SAFETY: `malloc_trim` takes no pointers and touches only glibc's own free lists,
        // which it locks while it works; any thread may call it at any time.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Runs the jemalloc control `name`, one that neither reads nor writes a value; jemalloc's
/// result (0, or an `errno` value).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mallctl_run(name: &std::ffi::CStr) -> std::ffi::c_int {
    #[allow(unsafe_code)]
    // SAFETY: the name is a NUL-terminated string that outlives the call; the controls run
    // here neither read nor write a value, so every value pointer is null and the length 0.
    // `thread.tcache.flush` touches the calling thread's own cache; `arena.<i>.purge` locks
    // each arena while it purges it; any thread may call either at any time.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
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
    /// Resident memory of this process in bytes (`VmRSS` of `/proc/self/status`, in kB).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn resident_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// What a policy load leaves behind, 64 MiB of small allocations freed, goes back to the
    /// system when asked, not ten seconds of allocation later.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn jemalloc_knows_the_controls_release_freed_runs() {
        // `release_freed` checks only the purge's result, and only in debug builds.
        assert_eq!(super::mallctl_run(c"thread.tcache.flush"), 0);
        assert_eq!(super::mallctl_run(c"arena.4096.purge"), 0);
        assert_ne!(super::mallctl_run(c"thread.tcache.flush_all"), 0);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_is_handed_back() {
        const MIB: usize = 1 << 20;
        let mut blocks: Vec<Vec<u8>> = (0..64 * 1024).map(|i| vec![i as u8; 1024]).collect();
        let full = resident_bytes();
        blocks.clear();
        blocks.shrink_to_fit();
        let freed = resident_bytes();
        super::release_freed();
        let released = resident_bytes();
        assert!(
            freed > released + 48 * MIB,
            "resident {} MiB filled, {} MiB freed, {} MiB released",
            full / MIB,
            freed / MIB,
            released / MIB
        );
    }

    /// The options jemalloc started with are the crate's (the symbol it reads is linked).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn jemalloc_runs_with_the_crates_options() {
        // The allocator is started by the test harness before this runs.
        drop(vec![0u8; 100]);
        let mut value: usize = 0;
        let mut len = std::mem::size_of::<usize>();
        #[allow(unsafe_code)]
        // SAFETY: a NUL-terminated name; `value` and `len` are a size_t and its length, which
        // jemalloc writes for a read-only option of that type.
        let result = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"opt.tcache_gc_incr_bytes".as_ptr(),
                (&raw mut value).cast(),
                &raw mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(result, 0);
        assert_eq!(value, 1 << 20, "jemalloc's default is 65536");
    }

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
