//! Noise schedules (in progress)
