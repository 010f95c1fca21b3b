#!/usr/bin/env bash
# Cross-builds slmd for 64-bit or 32-bit Arm Linux (llama.cpp included) and
# runs the real Arm binary under qemu-user (or builds the `vulkan` feature
# and runs it on Mesa's lavapipe): it loads the model, trains the
# demo's classifier heads, classifies the demo commands and extracts one
# command's intent and slots, then compares every label (and slot) with an
# x86-64 build's answer on the same inputs. Labels must match; confidences
# may differ by at most CONF_TOLERANCE (docs/CROSS.md says why).
#
#   scripts/cross-check.sh [aarch64|armv7]     default aarch64
#   scripts/cross-check.sh aarch64 --build-only  only the cross build
#   scripts/cross-check.sh vulkan               --features vulkan on lavapipe
#
# Environment:
#   SLMD_REFERENCE   an x86-64 slmd to compare with (default: build
#                    target/release/slmd from this checkout)
#   CONF_TOLERANCE   largest allowed confidence difference (default 0.01)
#   CROSS_TASKS      which of the demo's tasks to check: "home assist"
#                    (default) or "home" (the classify commands only: a few
#                    minutes of emulation instead of about 40)
#
# Installs what is missing on Debian: the GNU cross compilers, qemu-user and
# the rustup target. The cross build lands in target/<triple>/release/slmd;
# the run's files in target/cross-check/<arch>/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

arch=${1:-aarch64}
case $arch in
aarch64)
  triple=aarch64-unknown-linux-gnu
  gnu=aarch64-linux-gnu
  qemu=qemu-aarch64
  ;;
armv7)
  # Raspberry Pi OS 32-bit on a Pi 2 or later (ARMv7-A with NEON).
  triple=armv7-unknown-linux-gnueabihf
  gnu=arm-linux-gnueabihf
  qemu=qemu-arm
  ;;
vulkan) ;;
*)
  echo "usage: $0 [aarch64|armv7|vulkan] [--build-only]" >&2
  exit 2
  ;;
esac
tolerance=${CONF_TOLERANCE:-0.01}

have() { command -v "$1" >/dev/null 2>&1; }
need=()
have python3 || need+=(python3)
if [ "$arch" = vulkan ]; then
  # The loader and C++ headers, the shader compiler, SPIR-V headers, and
  # Mesa's drivers with lavapipe (a Vulkan device on the CPU).
  [ -e /usr/include/vulkan/vulkan.hpp ] || need+=(libvulkan-dev)
  have glslc || need+=(glslc)
  [ -e /usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake ] || need+=(spirv-headers)
  icd=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json 2>/dev/null | head -1 || true)
  [ -n "$icd" ] || need+=(mesa-vulkan-drivers)
else
  have "$gnu-gcc" || need+=("gcc-$gnu")
  have "$gnu-g++" || need+=("g++-$gnu")
  have "$qemu" || need+=(qemu-user)
fi
scripts/setup.sh "${need[@]}"

start=$(date +%s)
if [ "$arch" = vulkan ]; then
  icd=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json | head -1)
  echo "cross-check: building slmd --features vulkan" >&2
  # Its own target directory: the feature rebuilds llama.cpp.
  CARGO_TARGET_DIR=target/vulkan cargo build --release --locked --bins --features vulkan
  bin=$root/target/vulkan/release/slmd
  # lavapipe is a CPU-type device, which ggml's Vulkan backend passes over
  # unless it is named.
  runner=(env "VK_ICD_FILENAMES=$icd" GGML_VK_VISIBLE_DEVICES=0 "$bin")
  label="lavapipe (Vulkan on the CPU)"
else
  rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
  # The cc crate (and through it the cmake crate, which builds llama.cpp)
  # reads CC_<triple>/CXX_<triple>/AR_<triple>; cargo links with the cross
  # gcc; bindgen parses llama.h against the cross sysroot. The cmake crate
  # sets CMAKE_SYSTEM_NAME/PROCESSOR itself when target and host differ,
  # and llama-cpp-sys-2 turns GGML_NATIVE off: aarch64 gets
  # GGML_CPU_ARM_ARCH armv8-a (NEON, no dot-product), which every 64-bit
  # Pi runs.
  t=${triple//-/_}
  export "CC_$t=$gnu-gcc" "CXX_$t=$gnu-g++" "AR_$t=$gnu-ar"
  export "CARGO_TARGET_${t^^}_LINKER=$gnu-gcc"
  export "BINDGEN_EXTRA_CLANG_ARGS_$t=--sysroot=/usr/$gnu -I/usr/$gnu/include"
  if [ "$arch" = armv7 ]; then
    # Debian's armhf compiler defaults to VFPv3-D16 without NEON; ggml's Arm
    # kernels need NEON (-mfpu=neon-vfpv4: Cortex-A7 and later, Pi 2 onwards).
    export "CFLAGS_$t=-march=armv7-a -mfpu=neon-vfpv4 -mfloat-abi=hard"
    export "CXXFLAGS_$t=-march=armv7-a -mfpu=neon-vfpv4 -mfloat-abi=hard"
  fi
  echo "cross-check: building slmd for $triple" >&2
  cargo build --release --locked --bins --target "$triple"
  bin=$root/target/$triple/release/slmd
  runner=("$qemu" -L "/usr/$gnu" "$bin")
  label="$qemu (emulation: times are not device times)"
fi
echo "cross-check: built in $(($(date +%s) - start)) s" >&2
file "$bin" 2>/dev/null || true
[ "${2:-}" = --build-only ] && exit 0

if [ -n "${SLMD_REFERENCE:-}" ]; then
  ref=$SLMD_REFERENCE
else
  cargo build --release --locked --bins
  ref=$root/target/release/slmd
fi

# The model, fetched and verified once through its manifest.
"$ref" model fetch smollm2-135m-instruct-q4_1 --state-dir .cache/state --manifests models >&2

# Two state directories, so each build trains and caches its own heads from
# its own hidden states, as it would on a device (heads are keyed by model,
# prompt and examples: a second run reuses them; delete the directory to
# train again). One configuration per task of configs/demo.toml: a
# classify-only configuration keeps the cut model alone, while the extract
# task decodes its intents' prompts at every start.
work=$root/target/cross-check/$arch
mkdir -p "$work/configs"
ln -sfn "$root/configs/examples" "$work/configs/examples"
ln -sfn "$root/models" "$work/models"
for side in x86_64 "$arch"; do
  mkdir -p "$work/state-$side/models"
  for gguf in .cache/state/models/*.gguf; do
    [ -e "$work/state-$side/models/${gguf##*/}" ] ||
      ln "$gguf" "$work/state-$side/models/" 2>/dev/null || cp "$gguf" "$work/state-$side/models/"
  done
  python3 - configs/demo.toml "$work/configs" "$side" <<'PY'
import re, sys
text = open(sys.argv[1]).read().replace('dir = "../state"', f'dir = "../state-{sys.argv[3]}"', 1)
head, *tasks = re.split(r"(?m)^(?=\[\[tasks\]\]\s*$)", text)
for task in tasks:
    name = re.search(r'(?m)^name = "([^"]+)"', task).group(1)
    open(f"{sys.argv[2]}/{sys.argv[3]}-{name}.toml", "w").write(head + task)
PY
done

# The demo's commands (scripts/demo.sh) for the `home` classify task, and one
# for the `assist` extract task (intent and slots).
inputs=(
  "home|turn off the kitchen lights"
  "home|could you make me a cup of coffee"
  "home|dim the lights in the living room a bit"
  "home|start the robot vacuum"
  "home|switch the lights to a warm red"
  "home|turn the heater plug on"
  "home|lights on in the hallway please"
  "assist|set the bedroom lamp to 40 percent"
)

tasks=" ${CROSS_TASKS:-home assist} "
selected=()
for input in "${inputs[@]}"; do
  [[ $tasks == *" ${input%%|*} "* ]] && selected+=("$input")
done
((${#selected[@]})) || { echo "cross-check: CROSS_TASKS names none of: home assist" >&2; exit 2; }
inputs=("${selected[@]}")

run_side() { # side, then the command that runs slmd
  local side=$1
  shift
  : >"$work/$side.jsonl"
  for input in "${inputs[@]}"; do
    local task=${input%%|*} text=${input#*|}
    local t0 t1
    t0=$(date +%s.%N)
    "$@" classify --config "$work/configs/$side-$task.toml" --task "$task" "$text" \
      >"$work/out" 2>>"$work/$side.log"
    t1=$(date +%s.%N)
    python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"task": sys.argv[2], "text": sys.argv[3], "result": r, "seconds": round(float(sys.argv[5]) - float(sys.argv[4]), 2)}))' \
      "$work/out" "$task" "$text" "$t0" "$t1" >>"$work/$side.jsonl"
  done
}

echo "cross-check: x86-64 reference ($ref)" >&2
run_side x86_64 "$ref"
echo "cross-check: $arch under $label" >&2
run_side "$arch" "${runner[@]}"

python3 - "$work/x86_64.jsonl" "$work/$arch.jsonl" "$tolerance" "$arch" <<'PY'
import json, sys

ref = [json.loads(l) for l in open(sys.argv[1])]
arm = [json.loads(l) for l in open(sys.argv[2])]
tol = float(sys.argv[3])
arch = sys.argv[4]
bad = 0
worst = 0.0
print(f"{'task':7} {'text':42} {'label':22} {'x86-64':>7} {arch:>7} {'diff':>7} {'x86 s':>6} {arch + ' s':>10}")
for a, b in zip(ref, arm, strict=True):
    ra, rb = a["result"], b["result"]
    # A classify result names its label, an extract result its intent.
    la, lb = ra.get("label", ra.get("intent")), rb.get("label", rb.get("intent"))
    ca, cb = float(ra.get("confidence", 0)), float(rb.get("confidence", 0))
    diff = abs(ca - cb)
    worst = max(worst, diff)
    ok = la == lb and diff <= tol and ra.get("slots") == rb.get("slots")
    bad += not ok
    label = la if la == lb else f"{la} != {lb}"
    print(f"{a['task']:7} {a['text'][:42]:42} {label:22} {ca:7.4f} {cb:7.4f} {diff:7.4f} "
          f"{a['seconds']:6.2f} {b['seconds']:10.2f}{'' if ok else '  MISMATCH'}")
    if ra.get("slots") is not None or rb.get("slots") is not None:
        print(f"{'':8}slots x86-64 {json.dumps(ra.get('slots'), sort_keys=True)}")
        print(f"{'':8}slots {arch:6} {json.dumps(rb.get('slots'), sort_keys=True)}")
print(f"cross-check: {len(ref) - bad}/{len(ref)} match; largest confidence difference {worst:.4f} (tolerance {tol})")
sys.exit(1 if bad else 0)
PY
