#!/usr/bin/env bash
# Writes yocto/meta-slmd/recipes-support/slmd/slmd-crates.inc from Cargo.lock:
# every crates.io package with its sha256, in the form bitbake's crate://
# fetcher and `bitbake -c update_crates slmd` use, so do_compile never needs
# the network. With --check, only compares and exits 1 when they differ
# (run by the test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
inc=yocto/meta-slmd/recipes-support/slmd/slmd-crates.inc

generate() {
    awk '
        /^\[\[package\]\]/ { flush(); name = ""; version = ""; source = ""; sum = "" }
        /^name = /     { name = unq($3) }
        /^version = /  { version = unq($3) }
        /^source = /   { source = unq($3) }
        /^checksum = / { sum = unq($3) }
        END { flush(); emit() }
        function unq(s) { gsub(/"/, "", s); return s }
        function flush() {
            if (source ~ /^registry\+https:\/\/github.com\/rust-lang\/crates.io-index/) {
                n++; names[n] = name "-" version; urls[n] = name "/" version; sums[n] = sum
            } else if (source != "") {
                print "slmd-crates.inc: " name " " version " comes from " source \
                      ", which this script cannot pin" > "/dev/stderr"; bad = 1
            }
        }
        function emit() {
            print "# Generated from Cargo.lock by scripts/gen-crates-inc.sh; do not edit."
            print "# Every crate the build needs, fetched before do_compile (no network there)."
            print ""
            print "# The layout bitbake -c update_crates writes."
            print "# nooelint: oelint.vars.inconspaces,oelint.vars.notneededspace"
            print "SRC_URI += \" \\"
            for (i = 1; i <= n; i++) print "    crate://crates.io/" urls[i] " \\"
            print "\""
            print ""
            for (i = 1; i <= n; i++) print "SRC_URI[" names[i] ".sha256sum] = \"" sums[i] "\""
            if (bad) exit 1
        }
    ' Cargo.lock
}

if [ "${1:-}" = "--check" ]; then
    if ! diff -u "$inc" <(generate) >&2; then
        echo "$inc disagrees with Cargo.lock: run scripts/gen-crates-inc.sh" >&2
        exit 1
    fi
else
    generate >"$inc"
    echo "wrote $inc ($(grep -c '^SRC_URI\[' "$inc") crates)"
fi
