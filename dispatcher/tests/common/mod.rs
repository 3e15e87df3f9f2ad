//! Test support shared by the dispatcher's seeded tests (the simulation and
//! the power-loss test).
#![allow(dead_code)]

/// splitmix64: tiny, seedable, good enough for workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get((self.next() % items.len() as u64) as usize)
        }
    }
}

/// What a dispatcher call answers through its reply closure (with the
/// inline writer, within the call); `None` if it did not answer.
pub fn answered<T: Send + 'static>(call: impl FnOnce(Box<dyn FnOnce(T) + Send>)) -> Option<T> {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let answer = std::sync::Arc::clone(&slot);
    call(Box::new(move |value| {
        *answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }));
    let value = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    value
}
