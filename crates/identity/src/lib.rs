//! placeholder

pub mod user_token;
