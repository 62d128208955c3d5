#!/usr/bin/env bash
# Runs one fuzz target from its seeds, with the options it needs.
#
# Usage: fuzz/run.sh TARGET [SECONDS]   (default 600; e.g. fuzz/run.sh san_extraction 300)
#
# libFuzzer reads every directory after the first as seeds and writes what it finds to the
# first, corpus/TARGET (ignored by git). The seeds are valid inputs, so the first minutes
# are spent past the parsers' outer layers rather than finding them: from random bytes,
# san_extraction reached 512 coverage points in 5 minutes (38 M runs); from three
# certificates, 2,710 in the same time. Seeds are the files in seeds/TARGET plus what
# the repository already holds: the injector's AdmissionReviews and the examples' pods for
# admission_review, the examples' configs for config_yaml, the SPIFFE ID test vectors for
# spiffe_id.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
target="${1:?usage: fuzz/run.sh TARGET [SECONDS]}"
seconds="${2:-600}"
[ -f "$here/fuzz_targets/$target.rs" ] || {
    echo "no fuzz target $target; one of: $(cd "$here/fuzz_targets" && ls | sed 's/\.rs$//' | tr '\n' ' ')" >&2
    exit 64
}
command -v cargo-fuzz > /dev/null || {
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 69
}

seeds=()
[ -d "$here/seeds/$target" ] && seeds+=("$here/seeds/$target")
options=()
generated=""
trap '[ -z "$generated" ] || rm -rf "$generated"' EXIT
case "$target" in
    admission_review)
        seeds+=("$root/crates/injector/tests/data" "$root/examples/quickstart")
        ;;
    config_yaml)
        for dir in "$root"/examples/*/; do
            [ -f "$dir/config.yaml" ] && seeds+=("$dir")
        done
        ;;
    spiffe_id)
        # One input per vector: the first column of the table, comments and header left out.
        generated="$(mktemp -d)"
        grep -v '^#' "$root/crates/core/tests/data/spiffe_ids.tsv" | tail -n +2 | cut -f1 |
            split -l 1 -a 4 - "$generated/id-"
        # `split` keeps each line's newline; the parser is fed the ID alone.
        for file in "$generated"/id-*; do
            printf '%s' "$(cat "$file")" > "$file"
        done
        seeds+=("$generated")
        ;;
    mcp_classify | openai_classify | tools_list_filter)
        # Bodies and listings run to tens of KiB; the default 4 KiB cap stops short of the
        # inspection limits.
        options+=(-max_len=65536)
        ;;
esac

mkdir -p "$here/corpus/$target"
cd "$here"
# A stable toolchain runs cargo-fuzz's nightly flags with RUSTC_BOOTSTRAP (nightly ignores it).
RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 "${options[@]}"
