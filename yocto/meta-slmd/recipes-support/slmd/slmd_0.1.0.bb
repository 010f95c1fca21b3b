SUMMARY = "Offline small-language-model daemon: MQTT in, llama.cpp inference, MQTT out"
DESCRIPTION = "slmd classifies and extracts intents and slots from MQTT messages \
               with a quantised GGUF model run in-process by llama.cpp, storing \
               every message durably (sled) and publishing results back over \
               MQTT, entirely offline."
HOMEPAGE = "https://github.com/slmd/slmd"
BUGTRACKER = "https://github.com/slmd/slmd/issues"
CVE_PRODUCT = "slmd"
SECTION = "console/network"
LICENSE = "Apache-2.0"
# nooelint: oelint.var.licenseremotefile - the source tree has no licence file of its own yet
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# llama-cpp-sys-2 builds llama.cpp with CMake and generates its bindings with
# bindgen, which loads libclang (oe-core from whinlatter on, meta-clang on
# scarthgap).
DEPENDS += "clang-native cmake-native"

# The oldest Rust the locked crates build with (rust-version in Cargo.toml).
SLMD_MIN_RUST = "1.88"

# Skip, with the way out, rather than fail in do_compile when the build's
# Rust is older: scarthgap ships 1.75.
# nooelint: oelint.task.noanonpython - only parse time can skip a recipe
python () {
    rust = (d.getVar('RUSTVERSION') or '').rstrip('%')
    need = d.getVar('SLMD_MIN_RUST')
    if rust and bb.utils.vercmp_string_op(rust, need, '<'):
        raise bb.parse.SkipRecipe('slmd needs Rust %s or newer and this build has %s; '
                                  'on scarthgap add the scarthgap/rust branch of '
                                  'https://git.yoctoproject.org/meta-lts-mixins' % (need, rust))
}

# Point SLMD_SRC_URI/SRCREV at your mirror or a release tag (keep
# destsuffix=git); for development use externalsrc (docs/YOCTO.md).
SLMD_SRC_URI ?= "git://github.com/slmd/slmd.git;protocol=https;branch=main;destsuffix=git"
SRC_URI = "${SLMD_SRC_URI}"
# nooelint: oelint.vars.autorev - a default for development; releases set SRCREV
SRCREV ?= "${AUTOREV}"

# scarthgap unpacks into WORKDIR; styhead and later into UNPACKDIR.
# nooelint: oelint.vars.unpackdir
S = "${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}/git"

inherit cargo cargo-update-recipe-crates systemd useradd

# Every crate in Cargo.lock, pinned by sha256 (scripts/gen-crates-inc.sh).
require ${BPN}-crates.inc

export LIBCLANG_PATH = "${STAGING_LIBDIR_NATIVE}"
export BINDGEN_EXTRA_CLANG_ARGS = "--sysroot=${STAGING_DIR_TARGET} --target=${TARGET_SYS}"

# llama.cpp GPU backends (cargo features of slmd); the CPU backend is always in.
PACKAGECONFIG ??= ""
PACKAGECONFIG[cuda] = "--features cuda,,cuda-toolkit"
PACKAGECONFIG[vulkan] = "--features vulkan,,vulkan-loader vulkan-headers shaderc-native"
# `slmd eval`, `bench` and `replay` (measuring and demo tools): left out of
# the device's binary unless asked for.
PACKAGECONFIG[tools] = "--features tools"

# The workspace's default member is the `slmd` binary (crates/cli).
CARGO_BUILD_FLAGS += "--bins --no-default-features"

do_install:append() {
    install -d ${D}${systemd_system_unitdir} ${D}${sysconfdir}/slmd \
        ${D}${datadir}/slmd/models ${D}${nonarch_libdir}/sysusers.d \
        ${D}${nonarch_libdir}/tmpfiles.d ${D}${docdir}/slmd
    install -m 0644 ${S}/systemd/slmd.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/slmd.sysusers ${D}${nonarch_libdir}/sysusers.d/slmd.conf
    install -m 0644 ${S}/systemd/slmd.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/slmd.conf
    install -d ${D}${sysconfdir}/slmd/examples
    install -m 0644 ${S}/configs/slmd.toml ${D}${sysconfdir}/slmd/slmd.toml
    install -m 0644 ${S}/configs/examples/*.jsonl ${D}${sysconfdir}/slmd/examples/
    install -m 0644 ${S}/models/*.toml ${D}${datadir}/slmd/models/
    install -m 0644 ${S}/README.md ${D}${docdir}/slmd/
}

SYSTEMD_SERVICE:${PN} = "slmd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/slmd --no-create-home \
                       --shell ${base_sbindir}/nologin --user-group slmd"

CONFFILES:${PN} = "${sysconfdir}/slmd/slmd.toml"
FILES:${PN} += "${nonarch_libdir}/sysusers.d ${nonarch_libdir}/tmpfiles.d"
# Weights are fetched at run time (`slmd model fetch`) or shipped in their own
# package; a broker is usually on the device too.
RRECOMMENDS:${PN} = "mosquitto"
