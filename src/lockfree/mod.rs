//! lockfree
