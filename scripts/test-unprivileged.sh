#!/usr/bin/env bash
# Proves the skip rule: run as root, it builds the whole test suite, then runs every test
# binary as an unprivileged user (nobody) twice, from a copy of target/release that user can
# read:
#   1. plain: a test that cannot run prints `skipped: <test>: needs ...` and passes;
#   2. with MACVHOST_E2E_REQUIRED=1: exactly those tests fail, nothing else, and no test prints
#      `skipped:` except an opt-in test nobody opted into.
# Exits non-zero when the two runs disagree, or when a test fails in the plain run.
#
#   sudo bash scripts/test-unprivileged.sh [OUTDIR]      # default /tmp/mvh-unprivileged
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${1:-/tmp/mvh-unprivileged}
USER_ID=65534 # nobody
[[ $(id -u) -eq 0 ]] || { echo "run as root (it switches to uid $USER_ID itself)" >&2; exit 2; }

echo "==> building the test binaries (release, all targets)"
exes=$(cargo test --release --all-targets --features test-utils --no-run --message-format=json \
    | grep '"overflow_checks":[a-z]*,"test":true}' | grep -o '"executable":"[^"]*"' \
    | cut -d'"' -f4 | sort -u)

rm -rf "$OUT" && mkdir -p "$OUT/logs"
cp -a target/release "$OUT/release"
chmod -R a+rX "$OUT/release"
chmod 1777 "$OUT/logs"

# Test names on `skipped: NAME: needs ...` lines (NAME may contain `::`).
skipped_in() { sed -n 's/^skipped: \(.*\): needs .*/\1/p' "$1" | sort -u; }

run_all() { # MODE: plain | required
    local mode=$1 req=0 exe name
    [[ $mode == required ]] && req=1
    for exe in $exes; do
        name=$(basename "$exe")
        (cd /tmp && setpriv --reuid=$USER_ID --regid=$USER_ID --clear-groups \
            env MACVHOST_E2E_REQUIRED=$req "$OUT/release/deps/$name" --test-threads=1 \
            >"$OUT/logs/$mode-$name.out" 2>"$OUT/logs/$mode-$name.err") || true
    done
}

echo "==> plain run as uid $USER_ID"
run_all plain
echo "==> MACVHOST_E2E_REQUIRED=1 run as uid $USER_ID"
run_all required

status=0
printf '\n%-44s %8s %8s %8s %9s\n' "test binary" passed skipped "failed" "req.fail"
for exe in $exes; do
    name=$(basename "$exe")
    p="$OUT/logs/plain-$name"
    r="$OUT/logs/required-$name"
    skipped=$(skipped_in "$p.err")
    optin=$(grep '(opt-in)$' "$p.err" | skipped_in /dev/stdin || true)
    plain_failed=$(grep -o '^test .* \.\.\. FAILED' "$p.out" | cut -d' ' -f2 | sort -u || true)
    req_failed=$(grep -o '^test .* \.\.\. FAILED' "$r.out" | cut -d' ' -f2 | sort -u || true)
    req_skipped=$(skipped_in "$r.err")
    must_fail=$(comm -23 <(printf '%s\n' "$skipped" | sed '/^$/d') \
        <(printf '%s\n' "$optin" | sed '/^$/d'))
    passed=$(grep -c '^test .* \.\.\. ok$' "$p.out" || true)
    printf '%-44s %8s %8s %8s %9s\n' "${name%-*}" "$passed" "$(printf '%s' "$skipped" | grep -c . || true)" \
        "$(printf '%s' "$plain_failed" | grep -c . || true)" "$(printf '%s' "$req_failed" | grep -c . || true)"
    if [[ -n $plain_failed ]]; then
        echo "  FAILED without the switch: $plain_failed" | tr '\n' ' '; echo
        status=1
    fi
    if [[ "$must_fail" != "$req_failed" ]]; then
        echo "  mismatch: skipped plain (not opt-in) vs failed with the switch:"
        diff <(printf '%s\n' "$must_fail") <(printf '%s\n' "$req_failed") | sed 's/^/    /' || true
        status=1
    fi
    if [[ "$req_skipped" != "$optin" ]]; then
        echo "  skipped with the switch (only opt-in tests may): $req_skipped" | tr '\n' ' '
        echo
        status=1
    fi
done
echo
if ((status == 0)); then
    echo "OK: every test that cannot run here skips without the switch and fails with it"
else
    echo "FAILED: see above and $OUT/logs" >&2
fi
exit $status
