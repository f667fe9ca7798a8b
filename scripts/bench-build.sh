#!/usr/bin/env bash
# What a newcomer waits for, measured side by side in one run: for each variant, a fresh clone
# with an empty target directory and the warm package cache of this machine, then
#   1. a cold `cargo build --bins --locked` (the README's first build), wall and CPU time;
#   2. the whole `bash .ci/run` on a second fresh clone (CI's own command);
#   3. packages in Cargo.lock and crates in two or more versions (`cargo tree -d`);
#   4. release binary sizes (a release build after the timed steps, not timed).
# The variants run one after the other; the machine is shared, so only figures from one run are
# compared. Prints a Markdown table for BENCHMARKS.md.
#
#   scripts/bench-build.sh [BASE_REF [CHANGE_REF]]
#
# BASE_REF defaults to e538e0b (main before the single HTTP/TLS stack), CHANGE_REF to HEAD. A
# third variant, "CHANGE_REF with BASE_REF's profiles", separates what the dependency choice
# saves from what the build profiles save (cold build only). SKIP_CI=1 leaves out step 2 and
# SKIP_RELEASE=1 step 4; VARIANTS="base change" leaves out the third variant. Took 66 minutes
# here with everything in.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base=$(git -C "$repo" rev-parse --short "${1:-e538e0b}")
change=$(git -C "$repo" rev-parse --short "${2:-HEAD}")
work=$(mktemp -d /tmp/bench-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
results="$work/results.tsv"
: >"$results"

clone() { # clone <dir> <ref>
  git clone --quiet --no-hardlinks "$repo" "$1"
  git -C "$1" checkout --quiet --detach "$(git -C "$repo" rev-parse "$2")"
}

# Replaces everything from the first [profile.*] table on in <dir>/Cargo.toml with <ref>'s.
take_profiles() { # take_profiles <dir> <ref>
  local ours theirs
  ours=$(awk '/^\[profile\./{exit} {print}' "$1/Cargo.toml")
  theirs=$(git -C "$repo" show "$2:Cargo.toml" | awk '/^\[profile\./{p=1} p')
  printf '%s\n%s\n' "$ours" "$theirs" >"$1/Cargo.toml"
}

timed() { # timed <label> <what> <dir> <command...>; appends "label what wall cpu" to results
  local label=$1 what=$2 dir=$3
  shift 3
  echo "== $label: $what" >&2
  (cd "$dir" && /usr/bin/time -f '%e %U %S' -o "$work/time" "$@" >"$work/$label-$what.log" 2>&1) || {
    echo "$label: $what failed; last lines of its log:" >&2
    tail -n 30 "$work/$label-$what.log" >&2
    exit 1
  }
  read -r wall user sys <"$work/time"
  printf '%s\t%s\t%s\t%s\n' "$label" "$what" "$wall" "$(awk -v u="$user" -v s="$sys" 'BEGIN{print u + s}')" >>"$results"
  echo "   $wall s wall" >&2
}

lock_facts() { # lock_facts <label> <dir>
  local packages dups
  packages=$(grep -c '^name = ' "$2/Cargo.lock")
  dups=$(cd "$2" && cargo tree -d --workspace --depth 0 --prefix none --locked 2>/dev/null | awk 'NF{print $1}' | sort -u | wc -l)
  printf '%s\tpackages\t%s\t-\n%s\tduplicated\t%s\t-\n' "$1" "$packages" "$1" "$dups" >>"$results"
}

release_sizes() { # release_sizes <label> <dir>
  echo "== $1: release build (sizes)" >&2
  (cd "$2" && cargo build --release --bins --locked >"$work/$1-release.log" 2>&1)
  for bin in server client cli; do
    printf '%s\tsize-%s\t%s\t-\n' "$1" "$bin" "$(stat -c %s "$2/target/release/$bin")" >>"$results"
  done
}

read -r -a labels <<<"${VARIANTS:-base change profiles}"
declare -A ref_of=([base]=$base [change]=$change [profiles]=$change)
for label in "${labels[@]}"; do
  clone "$work/$label" "${ref_of[$label]}"
  [[ $label == profiles ]] && take_profiles "$work/$label" "$base"
  timed "$label" cold-build "$work/$label" cargo build --bins --locked
  lock_facts "$label" "$work/$label"
done
if [[ ${SKIP_CI:-0} != 1 ]]; then
  for label in base change; do
    clone "$work/$label-ci" "${ref_of[$label]}"
    timed "$label" ci-run "$work/$label-ci" bash .ci/run
    rm -rf "$work/$label-ci"
  done
fi
if [[ ${SKIP_RELEASE:-0} != 1 ]]; then
  for label in base change; do
    release_sizes "$label" "$work/$label"
  done
fi

# The table: one row per measure, one column per variant, and change / base.
python3 - "$results" "$base" "$change" <<'EOF'
import sys
from collections import defaultdict
rows = defaultdict(dict)
for line in open(sys.argv[1]):
    label, what, value, cpu = line.rstrip("\n").split("\t")
    rows[what][label] = (float(value), None if cpu == "-" else float(cpu))
names = {
    "cold-build": "cold `cargo build --bins`, s (CPU s)",
    "ci-run": "`bash .ci/run`, s (CPU s)",
    "packages": "packages in Cargo.lock",
    "duplicated": "crates in 2+ versions (`cargo tree -d`)",
    "size-server": "release `server`, bytes",
    "size-client": "release `client`, bytes",
    "size-cli": "release `cli`, bytes",
}
print(f"| measure | base `{sys.argv[2]}` | change `{sys.argv[3]}` | change / base | change with base's profiles |")
print("| --- | --- | --- | --- | --- |")
for what, name in names.items():
    if what not in rows:
        continue
    r = rows[what]
    def cell(label):
        if label not in r:
            return "-"
        v, cpu = r[label]
        text = f"{v:,.1f}" if cpu is not None else f"{v:,.0f}"
        return text + (f" ({cpu:,.0f})" if cpu is not None else "")
    ratio = f"{r['change'][0] / r['base'][0]:.2f}" if "base" in r and "change" in r else "-"
    print(f"| {name} | {cell('base')} | {cell('change')} | {ratio} | {cell('profiles')} |")
EOF
