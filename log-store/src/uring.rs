//! io_uring append backend (being written).
