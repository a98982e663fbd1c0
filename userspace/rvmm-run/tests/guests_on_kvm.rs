// SPDX-License-Identifier: GPL-2.0

//! Differential check of the guest images on this host's KVM: each image's serial
//! output, exit status and final architectural state must be the expected ones
//! (selftests/guests/expected), the same ones the kselftests require of rvmm and of
//! KVM ept=0 in Bochs. Needs `make -C selftests/guests`
//! first (scripts/test.sh does it); skipped, loudly, where /dev/kvm is missing.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Images this host's KVM cannot run, and why. (The development machine's /dev/kvm is
/// itself nested: it injects #GP when a 32-bit guest sets CR0.PG with 32-bit or PAE
/// paging, seen 2026-11-25; paging32's expected output is paging64's table, which the
/// hardware produced, restricted to the rows 32-bit paging has.)
/// avx64 ends in a KVM internal error at its XSETBV here, also seen 2026-11-25; its
/// expected output is the guest's own success message (it checks YMM0 and XCR0 itself).
const NOT_ON_THIS_KVM: &[(&str, &str)] = &[
    (
        "paging32",
        "nested KVM here faults on enabling paging from 32-bit protected mode",
    ),
    (
        "avx64",
        "nested KVM here returns an internal error on XSETBV",
    ),
    (
        "task32",
        "nested KVM here stops at the first task switch (a far JMP to a TSS: internal \
         error, emulation, seen 2026-12-07); the expected output is the guest's own lines \
         (it checks each switch itself), and rvmm matches KVM ept=0 in Bochs",
    ),
    (
        "pcid64",
        "KVM here does not offer PCID in CPUID; the expected output is the guest's own \
         success lines (it checks every read itself)",
    ),
];

/// Images whose first lines this host's KVM produces before it fails: (image, lines,
/// why). paging64's ring-0 table (34 lines) comes from the hardware this way; its ring-3
/// rows were checked by hand against SDM 4.6 (and agree with rvmm-core's exhaustive
/// walker test): nested KVM here triple-faults the guest at its first INT from ring 3.
const PREFIX_ON_THIS_KVM: &[(&str, usize, &str)] = &[
    (
        "mbtimer32",
        7,
        "nested KVM here fails to emulate the guest's first IRET from an interrupt \
         handler (KVM_INTERNAL_ERROR_EMULATION, bytes cf ..., seen 2026-12-02); the whole \
         run matches on KVM ept=0 in Bochs (guest_images_differential)",
    ),
    (
        "paging64",
        34,
        "nested KVM here fails the guest's first interrupt delivery from ring 3",
    ),
];

/// KVM on Intel (and rvmm) leave RIP at an OUT that exits to userspace until the next
/// run completes it; this host's /dev/kvm moves RIP past it before the exit (seen
/// 2026-11-25: hello64 ends at 0x100062 here, at 0x100060 on KVM ept=0 and rvmm in
/// Bochs). The images end with OUT imm8 (2 bytes) or OUT DX (1 byte): any other
/// difference fails.
fn same_state_but_host_rip_quirk(got: &str, want: &str) -> bool {
    let rip = |s: &str| {
        s.split(' ')
            .find_map(|f| f.strip_prefix("rip=0x"))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
    };
    let without_rip = |s: &str| {
        s.split(' ')
            .filter(|f| !f.starts_with("rip="))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match (rip(got), rip(want)) {
        (Some(g), Some(w)) => {
            without_rip(got) == without_rip(want) && (g == w || g == w + 1 || g == w + 2)
        }
        _ => false,
    }
}

#[test]
fn host_rip_quirk_is_narrow() {
    let w = "rax=0x2a rip=0x100060 rflags=0x46";
    assert!(same_state_but_host_rip_quirk(w, w));
    assert!(same_state_but_host_rip_quirk(
        "rax=0x2a rip=0x100062 rflags=0x46",
        w
    ));
    assert!(!same_state_but_host_rip_quirk(
        "rax=0x2a rip=0x100063 rflags=0x46",
        w
    ));
    assert!(!same_state_but_host_rip_quirk(
        "rax=0x2b rip=0x100060 rflags=0x46",
        w
    ));
}

#[test]
fn guest_images_match_expected_output_on_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: no /dev/kvm on this host");
        return;
    }
    let expected = root().join("selftests/guests/expected");
    let mut n = 0;
    for entry in std::fs::read_dir(&expected).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "out") {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if let Some((_, why)) = NOT_ON_THIS_KVM.iter().find(|(n, _)| *n == name) {
            eprintln!("SKIP {name} on KVM: {why}");
            continue;
        }
        let prefix_only = PREFIX_ON_THIS_KVM.iter().find(|(n, _, _)| *n == name);
        let image = root().join("target/guests").join(format!("{name}.elf"));
        assert!(
            image.exists(),
            "{} missing: run make -C selftests/guests",
            image.display()
        );
        let want_out = std::fs::read_to_string(&path).unwrap();
        let want_rc: i32 = std::fs::read_to_string(expected.join(format!("{name}.rc")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_rvmm-run"))
            .args(["run", "--kvm", "--dump-regs"])
            .arg(&image)
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        if let Some((_, lines, why)) = prefix_only {
            // KVM here stops part-way (see PREFIX_ON_THIS_KVM): what it printed must be
            // the expected output's first lines, at least `lines` of them.
            eprintln!("{name} on KVM: prefix only: {why}");
            let complete: String = got.lines().take(*lines).map(|l| format!("{l}\n")).collect();
            assert!(
                want_out.starts_with(&complete) && got.lines().count() >= *lines,
                "{name}: KVM printed {got}"
            );
            n += 1;
            continue;
        }
        assert_eq!(got, want_out, "{name}: serial output differs on KVM");
        assert_eq!(
            out.status.code(),
            Some(want_rc),
            "{name}: exit status on KVM; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The final architectural state: the one rvmm and KVM ept=0 must reach in Bochs.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let state = stderr
            .lines()
            .find_map(|l| l.strip_prefix("rvmm-run: final state: "))
            .unwrap_or_else(|| panic!("{name}: no final state: {stderr}"));
        let want_state = std::fs::read_to_string(expected.join(format!("{name}.state")))
            .unwrap_or_else(|e| panic!("{name}.state: {e}"));
        assert!(
            same_state_but_host_rip_quirk(state, want_state.trim()),
            "{name}: final state on KVM\n  {state}\nwant\n  {}",
            want_state.trim()
        );
        n += 1;
    }
    assert!(n >= 2, "only {n} guest images checked");
}

/// SMP start-up on this host's KVM (split irqchip), as the selftests do on rvmm and on
/// KVM ept=0 in Bochs: the ACPI wake-up mailbox (smpwake64, 3 vCPUs) and INIT/SIPI into
/// a real-mode trampoline (sipi64, 2 vCPUs).
#[test]
fn smp_images_on_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: no /dev/kvm on this host");
        return;
    }
    for (image, cpus, status, line) in [
        ("smpwake64.bin", "3", 0x59, "smpwake64: all APs up"),
        (
            "sipi64.bin",
            "2",
            0x55,
            "sipi64: the AP ran real mode and reached protected mode",
        ),
    ] {
        let path = root().join("target/guests").join(image);
        let out = Command::new(env!("CARGO_BIN_EXE_rvmm-run"))
            .args(["--kvm", "--machine", "pc", "--cpus", cpus])
            .arg(&path)
            .output()
            .expect("rvmm-run runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(status),
            "{image}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(line), "{image}: {stdout}");
    }
}
