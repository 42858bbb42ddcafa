#!/usr/bin/env bash
# The fuzz smoke run of CI (see fuzz/README.md): checks that the `records` target names
# every record enum of crates/store/src/records.rs, builds every fuzz target with cargo-fuzz, and
# runs each one for a short, bounded time from its seeds. A crash (panic, sanitizer error,
# leak, timeout) fails the script and prints where the input that caused it was saved.
#
# Usage: bash fuzz/smoke.sh [SECONDS_PER_TARGET]   (default: $FUZZ_SECONDS, else 25)
#        bash fuzz/smoke.sh --checks-only          (steps 1 and 2 below: seconds, no build)
#
# It runs on the stable toolchain. cargo-fuzz asks rustc for unstable flags (-Z sanitizer,
# -Z unstable-options, ...) that only a nightly compiler accepts; CI has only stable, and a
# nightly cannot be fetched on a fresh machine. RUSTC_BOOTSTRAP=1 makes the stable
# compiler accept them, for this build only (the variable is set on the cargo fuzz
# commands, not exported): the sanitizer runtimes ship with the stable toolchain, so the
# targets are built exactly as on nightly, with AddressSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."

checks_only=false
if [ "${1:-}" = --checks-only ]; then checks_only=true; shift; fi
seconds="${1:-${FUZZ_SECONDS:-25}}"
case "$seconds" in
  '' | *[!0-9]*) echo "seconds per target must be a whole number, not '$seconds'" >&2; exit 2 ;;
esac

# 1. Every record enum of the data file is decoded by the `records` target.
missing=()
while read -r name; do
  if ! grep -qw "$name" fuzz/fuzz_targets/records.rs; then missing+=("$name"); fi
done < <(grep -oP '^\s*pub enum \K\w+Record\b' crates/store/src/records.rs | sort -u)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "fuzz/fuzz_targets/records.rs does not decode these record enums of crates/store/src/records.rs:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  echo "add a round_trip::<...>() line for each (and a seed in fuzz/examples/make_seeds.rs)" >&2
  exit 1
fi
echo "records target: covers all $(grep -cP '^\s*pub enum \w+Record\b' crates/store/src/records.rs) record enums"

# 2. The fuzz crate's own Cargo.lock is up to date (cargo fuzz has no --locked of its own).
if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
  echo "fuzz/Cargo.lock is out of date (the dependencies of gatehouse changed?). Rebuild it" >&2
  echo "from the root lock, so that the fuzzed dependencies are those gatehouse ships with:" >&2
  echo "  cp Cargo.lock fuzz/Cargo.lock && cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null" >&2
  exit 1
fi
echo "fuzz/Cargo.lock: up to date"
if [ "$checks_only" = true ]; then exit 0; fi

# 3. Build every target (release, debug assertions, AddressSanitizer: cargo-fuzz's defaults).
echo "toolchain: $(rustc --version); $(cargo fuzz --version)"
targets=()
while read -r target; do targets+=("$target"); done < <(cargo fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
  echo "cargo fuzz list found no target" >&2
  exit 1
fi
start=$SECONDS
RUSTC_BOOTSTRAP=1 cargo fuzz build
echo "built ${targets[*]} in $((SECONDS - start)) s"

# 4. Run each target from its seeds; new inputs go to a temporary corpus, thrown away.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
touch "$work/stamp"
failed=()
for target in "${targets[@]}"; do
  if [ ! -d "fuzz/seeds/$target" ]; then
    echo "fuzz/seeds/$target is missing: regenerate the seeds (see fuzz/README.md)" >&2
    exit 1
  fi
  extra=()
  # Tokens may be up to 8 KiB: let inputs pass that limit (libFuzzer's default is 4096 bytes).
  if [ "$target" = jwt_parse ]; then extra+=(-max_len=9000); fi
  mkdir -p "$work/corpus/$target"
  echo "== fuzz $target for ${seconds} s"
  # -timeout: an input that takes 10 s is a hang, reported as a crash.
  if RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$work/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$seconds" -timeout=10 "${extra[@]}" >"$work/$target.log" 2>&1; then
    # libFuzzer's summary: executions, coverage (edges, features), corpus size.
    grep -E '^#[0-9]+[[:space:]]+DONE|^Done' "$work/$target.log" || true
  else
    failed+=("$target")
    echo "fuzz target $target FAILED; the last lines of its log:" >&2
    tail -n 60 "$work/$target.log" >&2
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo >&2
  echo "fuzz smoke failed for: ${failed[*]}" >&2
  # The crashing inputs, saved by libFuzzer, printed too so that a CI log is enough to
  # reproduce them.
  while read -r artifact; do
    echo "artifact: $artifact ($(wc -c <"$artifact") bytes); base64:" >&2
    head -c 65536 "$artifact" | base64 >&2
  done < <(find fuzz/artifacts -type f -newer "$work/stamp" 2>/dev/null | sort)
  echo "replay one with: cargo fuzz run TARGET ARTIFACT (RUSTC_BOOTSTRAP=1 on stable)" >&2
  exit 1
fi
echo "fuzz smoke: ${#targets[@]} targets, ${seconds} s each, no crash"
