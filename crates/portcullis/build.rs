//! Link flags for the `portcullis` binary.

fn main() {
    // DT_RELR: the executable's ~50k relative relocations packed into a bitmap (a few KiB)
    // instead of 24-byte records (~590 KiB) that the loader reads, and keeps resident, at
    // every start. Needs glibc 2.36 (Debian 12, the image's base).
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
