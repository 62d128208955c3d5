# Sourced by the benchmark scripts: builds packages' binaries as the image ships them, profile
# `dist` (fat LTO, one codegen unit; Cargo.toml) optimized with the execution profile
# crates/portcullis/pgo.profdata (benches/pgo/run.sh; the Dockerfile passes the same flag).
# RUSTFLAGS applies to every crate of the build, dependencies included: a `[profile]` cannot
# carry it on stable Cargo, and the other profiles (tests, `cargo run`) do without.
dist_build() { # cargo build arguments (packages, binaries)
    RUSTFLAGS="-Cprofile-use=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/crates/portcullis/pgo.profdata" \
        cargo build --profile dist --locked "$@"
}
