//! Rate limiter.
