//! One file per subcommand that is more than a few lines.

pub mod dev_certs;
