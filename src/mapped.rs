//! Weights used in place from memory-mapped safetensors files, as diffusers does.
//!
//! candle's CPU tensors own their memory (a `Vec<T>`), so a loader normally copies every weight
//! out of the file: 1.1-1.3 s for SD 1.5's 4.3 GB, against 0.3 s for diffusers, which leaves
//! its parameters mapped and lets the kernel read each page on first use. [`MappedAlloc`]
//! lets a `Vec` own a slice of a private file mapping instead: wrapped around the system
//! allocator, it recognises pointers into the mappings it made and, when such a `Vec` is
//! freed, hands the pages back (`MADV_DONTNEED`) instead of calling `free`. Loading is then
//! parsing the headers; the first forward pass faults the weights in from the page cache.
//!
//! The allocator must be the program's global allocator (`src/main.rs` installs it; so can a
//! test). The loader asks [`MappedAlloc::is_installed`] and reads into fresh buffers otherwise.
//! The mappings are private and writable: a tensor written in place gets its own copy of the
//! page and the file is never changed. As with every memory-mapped loader, a weight file must not
//! be rewritten in place while a model is loaded from it; sd-rs itself only ever replaces files
//! by renaming a new one over them, which leaves the mapped (old) file intact.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The most files mapped at once (a pipeline has three to five; sharded checkpoints more).
const SLOTS: usize = 256;

/// One mapping: its address range and how many owners it has (the [`MappedFile`] handle plus
/// one per adopted buffer). A free slot has `start == 0`.
struct Region {
    start: AtomicUsize,
    len: AtomicUsize,
    owners: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Region = Region {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    owners: AtomicUsize::new(0),
};
static REGIONS: [Region; SLOTS] = [EMPTY; SLOTS];
/// Slots below this index may be in use, so `dealloc` scans only those.
static SLOTS_USED: AtomicUsize = AtomicUsize::new(0);
/// Serialises claiming a slot (rare); lookups never lock.
static CLAIM: Mutex<()> = Mutex::new(());
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, plus ownership of buffers that live inside [`MappedFile`]s.
pub struct MappedAlloc;

impl MappedAlloc {
    /// Whether `MappedAlloc` is this program's global allocator (it has allocated something).
    pub fn is_installed() -> bool {
        INSTALLED.load(Ordering::Relaxed)
    }
}

/// The slot whose mapping holds `ptr`, if any.
fn region_of(ptr: *mut u8) -> Option<&'static Region> {
    let addr = ptr as usize;
    let used = SLOTS_USED.load(Ordering::Acquire);
    REGIONS[..used].iter().find(|r| {
        let start = r.start.load(Ordering::Acquire);
        start != 0 && addr >= start && addr < start + r.len.load(Ordering::Relaxed)
    })
}

/// Drops one owner of `region`; the last one unmaps it.
fn release(region: &Region) {
    if region.owners.fetch_sub(1, Ordering::AcqRel) == 1 {
        let start = region.start.load(Ordering::Acquire);
        let len = region.len.load(Ordering::Relaxed);
        // Cleared first, so no lookup matches a range the kernel may hand out again.
        region.start.store(0, Ordering::Release);
        // SAFETY: the range is a mapping this module made and nothing refers to it any more.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
    }
}

/// Gives the whole pages inside a freed buffer back to the kernel: they leave the resident set
/// now rather than when the last tensor of the file is freed.
fn discard_pages(ptr: *mut u8, size: usize) {
    let page = page_size();
    let start = (ptr as usize).div_ceil(page) * page;
    let end = (ptr as usize + size) / page * page;
    if end > start {
        // SAFETY: whole pages of a private mapping that only the freed buffer used.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(1) as usize
}

// SAFETY: every request is served by `System`, except buffers inside a mapping, which `System`
// never sees: their memory stays valid until their region's last owner is released.
unsafe impl GlobalAlloc for MappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match region_of(ptr) {
            Some(region) => {
                discard_pages(ptr, layout.size());
                release(region);
            }
            None => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(region) = region_of(ptr) else {
            return System.realloc(ptr, layout, new_size);
        };
        // A mapped buffer cannot grow in place: move it to the heap.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = System.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            release(region);
        }
        new
    }
}

/// A safetensors (or any) file mapped privately into memory, from which tensors' buffers can be
/// adopted as `Vec`s. The mapping outlives this handle for as long as any adopted buffer lives.
pub struct MappedFile {
    region: &'static Region,
    start: usize,
    len: usize,
}

impl MappedFile {
    /// Maps `file` (`len` bytes), or `None` when the allocator is not installed, the file is
    /// empty, every slot is taken or the kernel refuses (the caller then reads the file).
    pub fn map(file: &File, len: u64) -> Option<Self> {
        if !MappedAlloc::is_installed() || len == 0 || len > isize::MAX as u64 {
            return None;
        }
        let len = len as usize;
        let _claim = CLAIM.lock().ok()?;
        let slot = REGIONS
            .iter()
            .position(|r| r.start.load(Ordering::Acquire) == 0)?;
        // SAFETY: a fresh private mapping of an open file; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let region = &REGIONS[slot];
        region.owners.store(1, Ordering::Relaxed);
        region.len.store(len, Ordering::Relaxed);
        region.start.store(ptr as usize, Ordering::Release);
        SLOTS_USED.fetch_max(slot + 1, Ordering::AcqRel);
        Some(Self {
            region,
            start: ptr as usize,
            len,
        })
    }

    /// The `count` values of type `T` at byte `offset`, as a `Vec` that owns them where they
    /// lie in the mapping (no copy). `None` if they are not aligned for `T`, empty or out of
    /// range; the caller then reads them instead.
    ///
    /// Each range must be adopted at most once, as two `Vec`s must never share memory.
    pub fn adopt<T: Copy>(&self, offset: usize, count: usize) -> Option<Vec<T>> {
        let size = count.checked_mul(std::mem::size_of::<T>())?;
        let addr = self.start.checked_add(offset)?;
        if count == 0 || offset + size > self.len || addr % std::mem::align_of::<T>() != 0 {
            return None;
        }
        self.region.owners.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the range lies inside a live mapping, is aligned for T and (by the contract
        // above) owned by nothing else; every bit pattern of the plain numbers sd-rs reads is a
        // valid T; and the global allocator frees it by releasing the mapping, not with `free`.
        Some(unsafe { Vec::from_raw_parts(addr as *mut T, count, count) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        release(self.region);
    }
}

/// How many files are mapped now (each stays mapped while any tensor adopted from it lives).
pub fn mapped_files() -> usize {
    let used = SLOTS_USED.load(Ordering::Acquire);
    REGIONS[..used]
        .iter()
        .filter(|r| r.start.load(Ordering::Acquire) != 0)
        .count()
}
