// SPDX-License-Identifier: GPL-2.0

//! The C header is generated from the Rust ABI; this test fails when the committed
//! header is stale, or when a C compiler lays the structures out or numbers the
//! ioctls differently from Rust. `RVMM_BLESS=1 cargo test -p rvmm-uapi` rewrites it.

use rvmm_uapi::*;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

fn structs() -> Vec<(&'static str, &'static [CField], &'static [usize], usize)> {
    vec![
        (
            VmxCaps::C_NAME,
            VmxCaps::C_FIELDS,
            VmxCaps::offsets(),
            size_of::<VmxCaps>(),
        ),
        (Msi::C_NAME, Msi::C_FIELDS, Msi::offsets(), size_of::<Msi>()),
        (
            MpState::C_NAME,
            MpState::C_FIELDS,
            MpState::offsets(),
            size_of::<MpState>(),
        ),
        (
            Status::C_NAME,
            Status::C_FIELDS,
            Status::offsets(),
            size_of::<Status>(),
        ),
        (
            MemoryRegion::C_NAME,
            MemoryRegion::C_FIELDS,
            MemoryRegion::offsets(),
            size_of::<MemoryRegion>(),
        ),
        (
            Regs::C_NAME,
            Regs::C_FIELDS,
            Regs::offsets(),
            size_of::<Regs>(),
        ),
        (
            Segment::C_NAME,
            Segment::C_FIELDS,
            Segment::offsets(),
            size_of::<Segment>(),
        ),
        (
            Dtable::C_NAME,
            Dtable::C_FIELDS,
            Dtable::offsets(),
            size_of::<Dtable>(),
        ),
        (
            Sregs::C_NAME,
            Sregs::C_FIELDS,
            Sregs::offsets(),
            size_of::<Sregs>(),
        ),
        (
            VcpuRegs::C_NAME,
            VcpuRegs::C_FIELDS,
            VcpuRegs::offsets(),
            size_of::<VcpuRegs>(),
        ),
        (
            VcpuSregs::C_NAME,
            VcpuSregs::C_FIELDS,
            VcpuSregs::offsets(),
            size_of::<VcpuSregs>(),
        ),
        (
            ExitIo::C_NAME,
            ExitIo::C_FIELDS,
            ExitIo::offsets(),
            size_of::<ExitIo>(),
        ),
        (
            ExitMmio::C_NAME,
            ExitMmio::C_FIELDS,
            ExitMmio::offsets(),
            size_of::<ExitMmio>(),
        ),
        (
            ExitHypercall::C_NAME,
            ExitHypercall::C_FIELDS,
            ExitHypercall::offsets(),
            size_of::<ExitHypercall>(),
        ),
        (
            ExitFailEntry::C_NAME,
            ExitFailEntry::C_FIELDS,
            ExitFailEntry::offsets(),
            size_of::<ExitFailEntry>(),
        ),
        (
            ExitInternal::C_NAME,
            ExitInternal::C_FIELDS,
            ExitInternal::offsets(),
            size_of::<ExitInternal>(),
        ),
        (Run::C_NAME, Run::C_FIELDS, Run::offsets(), size_of::<Run>()),
        (
            VmStats::C_NAME,
            VmStats::C_FIELDS,
            VmStats::offsets(),
            size_of::<VmStats>(),
        ),
        (
            ShadowLimits::C_NAME,
            ShadowLimits::C_FIELDS,
            ShadowLimits::offsets(),
            size_of::<ShadowLimits>(),
        ),
        (
            HypercallExits::C_NAME,
            HypercallExits::C_FIELDS,
            HypercallExits::offsets(),
            size_of::<HypercallExits>(),
        ),
        (
            Interrupt::C_NAME,
            Interrupt::C_FIELDS,
            Interrupt::offsets(),
            size_of::<Interrupt>(),
        ),
        (
            CpuidEntry::C_NAME,
            CpuidEntry::C_FIELDS,
            CpuidEntry::offsets(),
            size_of::<CpuidEntry>(),
        ),
        (
            Cpuid::C_NAME,
            Cpuid::C_FIELDS,
            Cpuid::offsets(),
            size_of::<Cpuid>(),
        ),
        (
            MsrEntry::C_NAME,
            MsrEntry::C_FIELDS,
            MsrEntry::offsets(),
            size_of::<MsrEntry>(),
        ),
        (
            Msrs::C_NAME,
            Msrs::C_FIELDS,
            Msrs::offsets(),
            size_of::<Msrs>(),
        ),
    ]
}

fn header() -> String {
    let mut h = String::new();
    h.push_str(
        "/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */\n\
         /* Generated from uapi/src/lib.rs by `RVMM_BLESS=1 cargo test -p rvmm-uapi`: do not edit. */\n\
         #ifndef _UAPI_LINUX_RVMM_H\n#define _UAPI_LINUX_RVMM_H\n\n\
         #include <linux/ioctl.h>\n#include <linux/types.h>\n\n",
    );
    writeln!(h, "#define RVMM_IOCTL_TYPE 0x{RVMM_IOCTL_TYPE:X}").unwrap();
    writeln!(h, "#define RVMM_API_VERSION {RVMM_API_VERSION}").unwrap();
    for (name, value) in CONSTANTS {
        writeln!(h, "#define {name} {value}").unwrap();
    }
    h.push('\n');
    for (name, fields, _, _) in structs() {
        writeln!(h, "struct {name} {{").unwrap();
        for (decl, _) in fields {
            writeln!(h, "\t{decl};").unwrap();
        }
        h.push_str("};\n\n");
    }
    for (name, _, def) in IOCTLS {
        writeln!(h, "#define {name} {def}").unwrap();
    }
    h.push_str("\n#endif /* _UAPI_LINUX_RVMM_H */\n");
    h
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_header_is_current() {
    let path = root().join("include/linux/rvmm.h");
    let want = header();
    if std::env::var_os("RVMM_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        have, want,
        "uapi/include/linux/rvmm.h is stale: run RVMM_BLESS=1 cargo test -p rvmm-uapi"
    );
}

#[test]
fn c_compiler_agrees_with_rust() {
    let dir = std::env::temp_dir().join(format!("rvmm-uapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"linux/rvmm.h\"\nint main(void) {\n",
    );
    let mut want = String::new();
    for (name, fields, offsets, size) in structs() {
        writeln!(c, "printf(\"%zu\\n\", sizeof(struct {name}));").unwrap();
        writeln!(want, "{size}").unwrap();
        for ((_, field), off) in fields.iter().zip(offsets) {
            writeln!(c, "printf(\"%zu\\n\", offsetof(struct {name}, {field}));").unwrap();
            writeln!(want, "{off}").unwrap();
        }
    }
    for (name, value, _) in IOCTLS {
        writeln!(c, "printf(\"%lu\\n\", (unsigned long){name});").unwrap();
        writeln!(want, "{value}").unwrap();
    }
    for (name, value) in CONSTANTS {
        writeln!(c, "printf(\"%llu\\n\", (unsigned long long){name});").unwrap();
        writeln!(want, "{value}").unwrap();
    }
    writeln!(c, "printf(\"%d\\n\", RVMM_API_VERSION); return 0; }}").unwrap();
    writeln!(want, "{RVMM_API_VERSION}").unwrap();
    let src = dir.join("abi.c");
    let exe = dir.join("abi");
    std::fs::write(&src, c).unwrap();
    let ok = Command::new("cc")
        .arg("-I")
        .arg(root().join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("cc must be installed");
    assert!(ok.success(), "the generated header does not compile");
    let out = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        want,
        "C and Rust disagree on the ABI"
    );
}

#[test]
fn ioctl_fields_decode() {
    assert_eq!(ioc_type(RVMM_GET_STATUS), RVMM_IOCTL_TYPE);
    assert_eq!(ioc_nr(RVMM_GET_STATUS), 2);
    assert_eq!(ioc_size(RVMM_GET_STATUS), size_of::<Status>());
    assert_eq!(ioc_dir(RVMM_GET_STATUS), IOC_READ);
    assert_eq!(ioc_dir(RVMM_GET_API_VERSION), IOC_NONE);
}
