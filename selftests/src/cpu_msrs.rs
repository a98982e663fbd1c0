// SPDX-License-Identifier: GPL-2.0

//! MSRs every x86 kernel touches, as a guest sees them.

use crate::adversarial::{new_vcpu, run, Machine, CODE};
use crate::check;
use crate::ktap::Outcome;
use rvmm::guest::EntryMode;
use rvmm::uapi::Regs;
use rvmm::Exit;

/// IA32_MISC_ENABLE starts with fast strings on and BTS/PEBS unavailable and reads back
/// what the guest writes (kvm-unit-tests' msr test writes 0x400c50809). (The
/// machine-check MSRs: consist64 checks them against CPUID, `mca_banks` their values.)
pub fn misc_enable_reads_back(_: &crate::Ctx) -> Outcome {
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    #[rustfmt::skip]
    let code = [
        0xb9, 0xa0, 0x01, 0x00, 0x00,       // mov ecx, 0x1a0 (IA32_MISC_ENABLE)
        0x0f, 0x32,                         // rdmsr
        0xe7, 0x10,                         // out 0x10, eax
        0xb8, 0x09, 0x08, 0xc5, 0x00,       // mov eax, 0xc50809
        0xba, 0x04, 0x00, 0x00, 0x00,       // mov edx, 4
        0x0f, 0x30,                         // wrmsr
        0x31, 0xc0,                         // xor eax, eax
        0x31, 0xd2,                         // xor edx, edx
        0x0f, 0x32,                         // rdmsr
        0xe7, 0x11,                         // out 0x11, eax
        0x89, 0xd0,                         // mov eax, edx
        0xe7, 0x12,                         // out 0x12, eax
        0xf4,                               // hlt
    ];
    m.mem.write(CODE, &code)?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    for (port, want, what) in [
        (0x10, 0x1801, "IA32_MISC_ENABLE at reset"),
        (
            0x11,
            0x00c5_0809,
            "IA32_MISC_ENABLE bits 31:0 after writing 0x400c50809",
        ),
        (
            0x12,
            0x4,
            "IA32_MISC_ENABLE bits 63:32 after writing 0x400c50809",
        ),
    ] {
        let e = run(&v)?;
        check(
            e == Exit::IoOut {
                port,
                size: 4,
                data: want,
            },
            || format!("{what}: exit {e:?}, want OUT {want:#x} to port {port:#x}"),
        )?;
    }
    Ok(())
}

/// RDTSCP runs in the guest (CPUID shows it) and reads the guest's IA32_TSC_AUX, while
/// the host's (its CPU number, which RDTSCP and RDPID read in host userspace) is back
/// after every exit; IA32_TSC_ADJUST moves the guest's TSC when written and follows a
/// write to the TSC (SDM Vol. 3B, 18.17.3).
pub fn rdtscp_and_tsc_adjust(_: &crate::Ctx) -> Outcome {
    // This thread on CPU 0, so that the host's TSC_AUX is known.
    // SAFETY: a plain cpu_set_t for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            return Err(format!(
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let host_aux = || {
        let mut aux = 0u32;
        // SAFETY: RDTSCP exists on the VT-x CPUs rvmm runs on (Bochs' Haswell too).
        unsafe { core::arch::x86_64::__rdtscp(&mut aux) };
        aux & 0xfff
    };
    check(host_aux() == 0, || {
        format!("host TSC_AUX CPU {} on CPU 0", host_aux())
    })?;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    #[rustfmt::skip]
    let code = [
        0xb8, 0x01, 0x00, 0x00, 0x80,       // mov eax, 0x80000001
        0x0f, 0xa2,                         // cpuid
        0x89, 0xd0,                         // mov eax, edx
        0xe7, 0x10,                         // out 0x10, eax
        0xb9, 0x03, 0x01, 0x00, 0xc0,       // mov ecx, 0xc0000103 (IA32_TSC_AUX)
        0xb8, 0x34, 0x12, 0x00, 0x00,       // mov eax, 0x1234
        0x31, 0xd2,                         // xor edx, edx
        0x0f, 0x30,                         // wrmsr
        0x0f, 0x01, 0xf9,                   // rdtscp
        0x89, 0xc8,                         // mov eax, ecx
        0xe7, 0x11,                         // out 0x11, eax
        0x0f, 0x01, 0xf9,                   // rdtscp (again, after an exit)
        0x89, 0xc8,                         // mov eax, ecx
        0xe7, 0x12,                         // out 0x12, eax
        0xb9, 0x3b, 0x00, 0x00, 0x00,       // mov ecx, 0x3b (IA32_TSC_ADJUST)
        0x31, 0xc0,                         // xor eax, eax
        0xba, 0x00, 0x01, 0x00, 0x00,       // mov edx, 0x100
        0x0f, 0x30,                         // wrmsr (TSC_ADJUST = 1 << 40)
        0x0f, 0x31,                         // rdtsc
        0x89, 0xd0,                         // mov eax, edx
        0xe7, 0x13,                         // out 0x13, eax (TSC bits 63:32)
        0xb9, 0x10, 0x00, 0x00, 0x00,       // mov ecx, 0x10 (IA32_TIME_STAMP_COUNTER)
        0x31, 0xc0,                         // xor eax, eax
        0x31, 0xd2,                         // xor edx, edx
        0x0f, 0x30,                         // wrmsr (TSC = 0)
        0xb9, 0x3b, 0x00, 0x00, 0x00,       // mov ecx, 0x3b
        0x0f, 0x32,                         // rdmsr
        0x89, 0xd0,                         // mov eax, edx
        0xe7, 0x14,                         // out 0x14, eax (TSC_ADJUST bits 63:32)
        0xb9, 0x03, 0x01, 0x00, 0xc0,       // mov ecx, 0xc0000103
        0xba, 0x01, 0x00, 0x00, 0x00,       // mov edx, 1
        0x0f, 0x30,                         // wrmsr (reserved bits: #GP, no handler)
        0xf4,                               // hlt
    ];
    m.mem.write(CODE, &code)?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    let mut outs = Vec::new();
    for _ in 0..5 {
        match run(&v)? {
            Exit::IoOut { port, data, .. } => outs.push((port, data)),
            e => return Err(format!("exit {e:?} after {outs:x?}")),
        }
        check(host_aux() == 0, || {
            format!(
                "after a guest exit the host's TSC_AUX says CPU {}",
                host_aux()
            )
        })?;
    }
    let e = run(&v)?;
    check(e == Exit::Shutdown, || {
        format!("WRMSR of TSC_AUX bits 63:32: exit {e:?}, want #GP (a shutdown without an IDT)")
    })?;
    let get = |p: u16| outs.iter().find(|o| o.0 == p).map(|o| o.1);
    check(get(0x10).is_some_and(|d| d & (1 << 27) != 0), || {
        format!("CPUID.80000001H:EDX {:x?} without RDTSCP", get(0x10))
    })?;
    check(
        get(0x11) == Some(0x1234) && get(0x12) == Some(0x1234),
        || {
            format!(
                "RDTSCP gave ECX {:x?} and {:x?}, want 0x1234",
                get(0x11),
                get(0x12)
            )
        },
    )?;
    check(get(0x13).is_some_and(|h| h >= 0x100), || {
        format!(
            "TSC bits 63:32 {:x?} after TSC_ADJUST += 1 << 40",
            get(0x13)
        )
    })?;
    check(get(0x14) == Some(0xffff_ffff), || {
        format!(
            "TSC_ADJUST bits 63:32 {:x?} after the TSC was set to 0, want negative",
            get(0x14)
        )
    })
}

/// The machine-check MSRs a kernel sets up at boot, as on a CPU with MCA and no error
/// logged: IA32_MCG_CAP gives the banks, each bank's MCi_CTL takes all ones and reads
/// it back, MCi_STATUS takes zero, IA32_MCG_CTL all ones; the guest's view stays its own
/// across exits.
pub fn mca_banks(_: &crate::Ctx) -> Outcome {
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    #[rustfmt::skip]
    let code = [
        0xb9, 0x79, 0x01, 0x00, 0x00,       // mov ecx, 0x179 (IA32_MCG_CAP)
        0x0f, 0x32,                         // rdmsr
        0xe7, 0x10,                         // out 0x10, eax
        0xb9, 0x24, 0x04, 0x00, 0x00,       // mov ecx, 0x424 (MC9_CTL)
        0xb8, 0xff, 0xff, 0xff, 0xff,       // mov eax, -1
        0xba, 0xff, 0xff, 0xff, 0xff,       // mov edx, -1
        0x0f, 0x30,                         // wrmsr
        0xb9, 0x25, 0x04, 0x00, 0x00,       // mov ecx, 0x425 (MC9_STATUS)
        0x31, 0xc0,                         // xor eax, eax
        0x31, 0xd2,                         // xor edx, edx
        0x0f, 0x30,                         // wrmsr
        0xb9, 0x7b, 0x01, 0x00, 0x00,       // mov ecx, 0x17b (IA32_MCG_CTL)
        0xb8, 0xff, 0xff, 0xff, 0xff,       // mov eax, -1
        0xba, 0xff, 0xff, 0xff, 0xff,       // mov edx, -1
        0x0f, 0x30,                         // wrmsr
        0xe7, 0x11,                         // out 0x11, eax (an exit between)
        0xb9, 0x24, 0x04, 0x00, 0x00,       // mov ecx, 0x424
        0x0f, 0x32,                         // rdmsr
        0x31, 0xd0,                         // xor eax, edx
        0xe7, 0x12,                         // out 0x12, eax (0: both halves all ones)
        0x89, 0xd0,                         // mov eax, edx
        0xe7, 0x13,                         // out 0x13, eax
        0xb9, 0x7b, 0x01, 0x00, 0x00,       // mov ecx, 0x17b
        0x0f, 0x32,                         // rdmsr
        0xe7, 0x14,                         // out 0x14, eax
        0xb9, 0x25, 0x04, 0x00, 0x00,       // mov ecx, 0x425
        0xb8, 0x01, 0x00, 0x00, 0x00,       // mov eax, 1
        0x0f, 0x30,                         // wrmsr (status bits: #GP, no handler)
        0xf4,                               // hlt
    ];
    m.mem.write(CODE, &code)?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    let mut outs = Vec::new();
    for _ in 0..5 {
        match run(&v)? {
            Exit::IoOut { port, data, .. } => outs.push((port, data)),
            e => return Err(format!("exit {e:?} after {outs:x?}")),
        }
    }
    let e = run(&v)?;
    check(e == Exit::Shutdown, || {
        format!("WRMSR of MC9_STATUS = 1: exit {e:?}, want #GP (a shutdown without an IDT)")
    })?;
    let get = |p: u16| outs.iter().find(|o| o.0 == p).map(|o| o.1);
    let cap = get(0x10).unwrap_or(0);
    check(cap & 0xff >= 10 && cap & (1 << 8) != 0, || {
        format!("IA32_MCG_CAP {cap:#x}: want 10 banks or more and MCG_CTL_P")
    })?;
    check(
        get(0x12) == Some(0) && get(0x13) == Some(0xffff_ffff),
        || {
            format!(
                "MC9_CTL read back as {:x?}/{:x?}, want all ones",
                get(0x12),
                get(0x13)
            )
        },
    )?;
    check(get(0x14) == Some(0xffff_ffff), || {
        format!("IA32_MCG_CTL read back as {:x?}", get(0x14))
    })
}
