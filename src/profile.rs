//! Time per kind of layer, for `sd-rs bench --profile`.
//!
//! On a GPU the kernels run asynchronously, so a timer around a layer measures only the launch;
//! and a machine lent for minutes has no CUDA toolkit, so no nsys or ncu. When profiling is on,
//! each instrumented layer waits for the device before and after its work, which makes the time
//! between the two waits that layer's own (launches and kernels). The waits slow the whole run
//! down, so profiled runs are for the breakdown, not for the headline time. Off (the default),
//! a scope is one relaxed atomic load.
//!
//! Only the outermost scope on a thread counts, so that time is never counted twice: were an
//! instrumented layer to call another, the inner one's time would be the outer kind's.
use candle_core::Device;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, Total>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// Whether a scope is open on this thread.
    static OPEN: Cell<bool> = const { Cell::new(false) };
    /// Time recorded by scopes on this thread, for [`remainder`].
    static RECORDED: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Calls and time of one kind of layer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Total {
    pub calls: u64,
    pub time: Duration,
}

pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// A layer's work in progress; its time is recorded under `kind` when it is dropped.
#[must_use = "the scope measures until it is dropped"]
pub struct Scope {
    kind: &'static str,
    device: Device,
    start: Instant,
}

/// Starts timing a layer of kind `kind` running on `device`; `None` when profiling is off or
/// an enclosing layer is already being timed.
pub fn scope(kind: &'static str, device: &Device) -> Option<Scope> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    if OPEN.with(|open| open.replace(true)) {
        return None;
    }
    // Earlier layers' kernels must not be charged to this one. An error here would resurface
    // in the layer's own work, so it is not reported twice.
    let _ = device.synchronize();
    Some(Scope {
        kind,
        device: device.clone(),
        start: Instant::now(),
    })
}

impl Drop for Scope {
    fn drop(&mut self) {
        let _ = self.device.synchronize();
        let time = self.start.elapsed();
        OPEN.with(|open| open.set(false));
        RECORDED.with(|recorded| recorded.set(recorded.get() + time));
        add(self.kind, time);
    }
}

/// One more call of `kind`, taking `time`.
fn add(kind: &'static str, time: Duration) {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let total = totals.entry(kind).or_default();
    total.calls += 1;
    total.time += time;
}

/// Runs `work` and charges to `kind` the part of its time that no scope it opened (on this
/// thread) recorded: e.g. candle's backward pass, whose layers' gradients are timed by their
/// own scopes, leaving candle's own ops and its summing of gradients under `kind`. Unlike a scope it leaves the
/// scopes inside it counting.
pub fn remainder<R>(kind: &'static str, device: &Device, work: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) || OPEN.with(Cell::get) {
        return work();
    }
    let recorded = || RECORDED.with(Cell::get);
    let _ = device.synchronize();
    let (before, start) = (recorded(), Instant::now());
    let out = work();
    let _ = device.synchronize();
    let elapsed = start.elapsed();
    let inside = recorded().saturating_sub(before);
    add(kind, elapsed.saturating_sub(inside));
    out
}

/// The totals recorded since the last call, by kind, and clears them.
pub fn take() -> BTreeMap<&'static str, Total> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Profiling is global: these tests must not switch it off or take totals under each other.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn outermost_scopes_are_counted_and_nested_ones_charged_to_them() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        set_enabled(true);
        take();
        let cpu = Device::Cpu;
        {
            let _outer = scope("outer", &cpu);
            assert!(
                scope("inner", &cpu).is_none(),
                "a nested scope must not count"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(scope("inner", &cpu));
        let totals = take();
        set_enabled(false);
        assert_eq!(totals["outer"].calls, 1);
        assert!(totals["outer"].time >= Duration::from_millis(20));
        assert_eq!(
            totals["inner"].calls, 1,
            "after the outer scope, inner counts"
        );
        assert!(totals["inner"].time < Duration::from_millis(20));
        // (Other unit tests may run layers meanwhile, so only this test's kinds are checked.)
        assert!(!take().contains_key("outer"), "take clears the totals");
        assert!(scope("off", &cpu).is_none(), "off: no scope");
    }

    #[test]
    fn remainder_is_the_time_no_scope_inside_recorded() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        set_enabled(true);
        let cpu = Device::Cpu;
        let start = Instant::now();
        remainder("rest", &cpu, || {
            std::thread::sleep(Duration::from_millis(15));
            let _inner = scope("timed inside", &cpu);
            std::thread::sleep(Duration::from_millis(20));
        });
        let total = start.elapsed();
        let totals = take();
        set_enabled(false);
        let (rest, inner) = (totals["rest"], totals["timed inside"]);
        assert_eq!((rest.calls, inner.calls), (1, 1));
        assert!(inner.time >= Duration::from_millis(20), "{inner:?}");
        assert!(rest.time >= Duration::from_millis(15), "{rest:?}");
        assert!(
            rest.time + inner.time <= total,
            "{rest:?} + {inner:?} > {total:?}"
        );
    }
}
