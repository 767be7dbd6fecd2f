//! The code pages a proxy keeps mapped once it has started (docs/PERFORMANCE.md, "Memory, idle
//! RSS broken down").
//!
//! Start-up runs code and reads data that a running proxy never needs again: argument parsing,
//! the resources file's YAML, configuration checks, TLS set-up, the dynamic linker's pass over
//! the relocation tables, the C library's initialisation. Their pages stay mapped, and the
//! kernel's fault-around has mapped their 64 KiB neighbourhoods with them: about 2.5 MiB of a
//! sidecar's resident set after start (the executable's ~1.5 MiB, its libraries' ~1 MiB).

/// Unmaps, from this process, the read-only pages of the executable and of every library it
/// has loaded (code, constants, unwind and relocation tables); the kernel maps back, from the
/// page cache, whatever runs next. Returns the bytes of address space released (mapped or
/// not). Only segments that are never written are touched: relocated (RELRO) and writable data
/// keep their contents, and an object with text relocations (its code written at load) is
/// skipped whole; so is the vDSO (not a file).
///
/// What this saves is what the process maps (VmRSS, Pss), not memory: the pages stay in the
/// page cache, shared with every other process running the same files, until the kernel needs
/// the memory, when pages no process maps are the first it reclaims.
#[cfg(target_os = "linux")]
pub fn release_startup_pages() -> usize {
    use std::ffi::c_void;

    /// `Elf64_Dyn`: one entry of an object's dynamic section.
    #[repr(C)]
    struct Dyn {
        tag: i64,
        val: u64,
    }
    const DT_NULL: i64 = 0;
    const DT_TEXTREL: i64 = 22;
    const DT_FLAGS: i64 = 30;
    const DF_TEXTREL: u64 = 0x4;

    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _size: libc::size_t, out: *mut c_void) -> libc::c_int {
        // SAFETY: the dynamic linker passes a valid `dl_phdr_info` for the duration of the
        // call, and `out` is the `Vec` given to `dl_iterate_phdr` below.
        let (info, out) = unsafe { (&*info, &mut *(out as *mut Vec<(usize, usize)>)) };
        // The executable has an empty name, libraries their path; the vDSO's is not a path.
        // SAFETY: `dlpi_name` is null or a NUL-terminated string.
        let name = (!info.dlpi_name.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) });
        if info.dlpi_phdr.is_null() || name.is_some_and(|n| !n.is_empty() && !n.to_bytes().starts_with(b"/")) {
            return 0;
        }
        // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
        let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        let base = info.dlpi_addr as usize;
        if let Some(dynamic) = headers.iter().find(|h| h.p_type == libc::PT_DYNAMIC) {
            let mut entry = (base + dynamic.p_vaddr as usize) as *const Dyn;
            // SAFETY: PT_DYNAMIC of a loaded object: mapped entries up to DT_NULL.
            while let Some(d) = unsafe { entry.as_ref() }.filter(|d| d.tag != DT_NULL) {
                if d.tag == DT_TEXTREL || (d.tag == DT_FLAGS && d.val & DF_TEXTREL != 0) {
                    return 0;
                }
                entry = entry.wrapping_add(1);
            }
        }
        for h in headers.iter().filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_W == 0) {
            let start = base + h.p_vaddr as usize;
            out.push((start, start + h.p_memsz as usize));
        }
        0
    }

    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return 0,
    };
    let mut segments: Vec<(usize, usize)> = Vec::new();
    // SAFETY: the callback only reads the headers it is given and writes to `segments`.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut segments).cast()) };
    let mut released = 0;
    for (start, end) in segments {
        // Whole pages inside the segment only: a page shared with a writable segment keeps
        // that segment's data.
        let (start, end) = (start.div_ceil(page) * page, end / page * page);
        if end <= start {
            continue;
        }
        // SAFETY: the range is whole pages of a segment mapped read-only from its file and
        // never written; MADV_DONTNEED drops this process's mappings of them, and the next
        // access maps the same file contents again.
        if unsafe { libc::madvise(start as *mut c_void, end - start, libc::MADV_DONTNEED) } == 0 {
            released += end - start;
        }
    }
    released
}

#[cfg(not(target_os = "linux"))]
pub fn release_startup_pages() -> usize {
    0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Resident KiB of the code mappings (`r-xp`) of the files whose path contains `file`
    /// (`/proc/self/smaps`).
    fn resident_code_kib(file: &str) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
                ours = fields.len() > 5 && fields[1] == "r-xp" && fields[5].contains(file);
            } else if ours && fields.first() == Some(&"Rss:") {
                kib += fields[1].parse::<u64>().unwrap_or(0);
            }
        }
        kib
    }

    fn exe() -> String {
        std::fs::read_link("/proc/self/exe").expect("exe").to_string_lossy().into_owned()
    }

    #[inline(never)]
    fn work(n: u64) -> u64 {
        (0..n).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7)).fold(0, u64::wrapping_add)
    }

    /// Whether this process maps the page holding `addr` (`/proc/self/pagemap`, bit 63).
    fn mapped(addr: usize) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        pagemap.seek(SeekFrom::Start(addr as u64 / page * 8)).expect("seek");
        let mut entry = [0u8; 8];
        pagemap.read_exact(&mut entry).expect("read");
        u64::from_le_bytes(entry) >> 63 == 1
    }

    /// Constants of 256 KiB, in the executable's read-only data: its middle page is more than
    /// a fault-around window (64 KiB) away from anything else the test touches, so it is mapped
    /// only when it is read.
    static TABLE: [u8; 1 << 18] = [0x5a; 1 << 18];

    #[test]
    fn read_only_pages_are_released_and_come_back_when_used() {
        let (exe, libc) = (exe(), "/libc.so");
        let middle = &TABLE[TABLE.len() / 2];
        // SAFETY: a reference to a byte of a static.
        assert_eq!(unsafe { std::ptr::read_volatile(middle) }, 0x5a);
        let before = (resident_code_kib(&exe), resident_code_kib(libc), mapped(middle as *const u8 as usize));
        let released = release_startup_pages();
        let after = (resident_code_kib(&exe), resident_code_kib(libc), mapped(middle as *const u8 as usize));
        assert!(released > 0, "nothing released");
        assert!(before.2, "the constants' page was read before the release");
        assert!(!after.2, "the constants' page is still mapped after the release");
        assert!(after.0 < before.0, "the executable's code: {} KiB resident before, {} KiB after", before.0, after.0);
        assert!(after.1 < before.1, "the C library's code: {} KiB resident before, {} KiB after", before.1, after.1);
        // Released pages come back, with their contents, when used: the constants, code
        // (a computation, formatting, a panic caught and unwound).
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile(middle) }, 0x5a);
        assert!(mapped(middle as *const u8 as usize), "the constants' page was not mapped back when read");
        assert_eq!(work(1000), work(1000));
        assert_eq!(format!("{:?}", Some("x")), "Some(\"x\")");
        assert!(std::panic::catch_unwind(|| std::panic::resume_unwind(Box::new(1))).is_err());
        // Data written after start (relocated pointers, statics) is intact.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(7);
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        release_startup_pages();
        assert_eq!(COUNTER.load(std::sync::atomic::Ordering::Relaxed), 8);
    }
}
