//! sd-data
