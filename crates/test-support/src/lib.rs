//! placeholder

pub mod jwt;
