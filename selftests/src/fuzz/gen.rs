// SPDX-License-Identifier: GPL-2.0

//! What the fuzzer feeds rvmm: ABI structures with values on and around the valid ones,
//! and random guests (code, page tables, CPU state).
//!
//! The structure generators allocate nothing: forked children use them too (a child of
//! a multithreaded process must not touch the heap).

use super::ops::Env;
use super::rng::Rng;
use rvmm::guest::{setup, EntryMode, GuestMem};
use rvmm::uapi::{self, Dtable, Regs, Segment, Sregs};

/// Guest RAM of a VM the fuzzer builds guests in (slot 0, at guest-physical 0).
pub const RAM_SIZE: usize = 2 << 20;
/// A read-only region (a "ROM").
pub const ROM_SIZE: usize = 64 << 10;
/// Where vCPU `id`'s code, IDT, page tables and stack go: `VCPU_AREA + id * AREA_SIZE`.
pub const VCPU_AREA: u64 = 0x4_0000;
pub const AREA_SIZE: u64 = 0x1_0000;
/// The shared long-mode tables and GDT `rvmm::guest::setup` builds: 0..IMAGE_SIZE.
pub const IMAGE_SIZE: usize = 0x8000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;

/// Kernel, non-canonical and other never-mapped addresses.
pub const BAD_ADDRS: &[u64] = &[
    0,
    8,
    0xfff,
    0x1000,
    0xffff_8000_0000_0000,
    0xffff_8880_0000_0000,
    0xffff_c900_0000_0000,
    0xffff_ffff_8100_0000,
    0xffff_ffff_ff60_0000,
    0xffff_ffff_ffff_f000,
    u64::MAX - 7,
    u64::MAX,
    0x8000_0000_0000_0000,
    0x0000_8000_0000_0000,
    0x7fff_0000_0000_0000,
];

/// MSRs rvmm virtualizes, or that a guest or VMM would try.
pub const MSRS: &[u32] = &[
    0x10,
    0x1b,
    0x3a,
    0x48,
    0xfe,
    0x174,
    0x175,
    0x176,
    0x1a0,
    0x1d9,
    0x277,
    0x2ff,
    0x480,
    0x6e0,
    0x802,
    0x808,
    0x80b,
    0x80f,
    0x830,
    0x832,
    0x838,
    0x83e,
    0x83f,
    0xc000_0080,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
    0xc000_0103,
    0xc001_0000,
];

/// CPU states to start from: what `rvmm::guest::setup` builds, and its memory image.
pub struct Templates {
    pub image: Vec<u8>,
    pub protected: Sregs,
    pub long: Sregs,
}

impl Templates {
    pub fn new() -> Result<Self, String> {
        let mut mem = GuestMem::new(IMAGE_SIZE).map_err(|e| format!("template memory: {e}"))?;
        let (_, long) = setup(&mut mem, EntryMode::Long, 0, 0)?;
        let (_, protected) = setup(&mut mem, EntryMode::Protected, 0, 0)?;
        let mut image = vec![0u8; IMAGE_SIZE];
        mem.read(0, &mut image)?;
        Ok(Self {
            image,
            protected,
            long,
        })
    }
}

/// Real mode with every segment at `base` (below 1 MiB).
pub fn real_mode(base: u64) -> Sregs {
    let seg = |t: u8| Segment {
        base,
        limit: 0xffff,
        selector: (base >> 4) as u16,
        seg_type: t,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = seg(3);
    Sregs {
        cs: seg(0xb),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            seg_type: 0xb,
            s: 0,
            selector: 0,
            base: 0,
            ..seg(0xb)
        },
        ldt: Segment {
            seg_type: 2,
            s: 0,
            selector: 0,
            base: 0,
            ..seg(2)
        },
        gdt: Dtable {
            base: 0,
            limit: 0xffff,
            padding: [0; 3],
        },
        idt: Dtable {
            base: 0,
            limit: 0x3ff,
            padding: [0; 3],
        },
        cr0: CR0_ET,
        ..Default::default()
    }
}

/// A vCPU index: mostly one that exists, sometimes any.
pub fn vcpu_index(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0..=6 => rng.below(3) as u32,
        7 | 8 => rng.below(8) as u32,
        _ => rng.interesting_u32(),
    }
}

/// Mostly zero (the ABI's padding and reserved fields), sometimes not.
fn mostly_zero(rng: &mut Rng) -> u32 {
    if rng.pct(90) {
        0
    } else {
        rng.interesting_u32()
    }
}

/// A backing address for a memory region: inside one of our own mappings (each ends in
/// a guard page, so no size pins memory beyond it), or one that is never mapped. Never
/// an arbitrary address: a slot on the fuzzer's heap or stack would let guests write it.
fn region_uaddr(rng: &mut Rng, env: &Env, size: u64) -> u64 {
    let (base, len) = match rng.below(10) {
        0..=5 => env.ram,
        6 | 7 => env.rom,
        8 => (env.mem.scratch, super::ops::SCRATCH_LEN),
        _ => return bad_addr(rng, env) as u64,
    };
    if base == 0 {
        return 0;
    }
    let pages = (len as u64 / 4096).saturating_sub(size.min(len as u64) / 4096);
    let off = rng.below(pages + 1) * 4096;
    let misalign = if rng.pct(8) { rng.range(1, 4095) } else { 0 };
    base as u64 + off + misalign
}

/// `RVMM_SET_MEMORY_REGION`: slots in and out of range, every flag, sizes from a page
/// to beyond the per-slot limit, addresses that overlap, wrap, or sit on the APIC.
pub fn memory_region(rng: &mut Rng, env: &Env) -> uapi::MemoryRegion {
    let slot = match rng.below(10) {
        0..=6 => rng.below(6) as u32,
        7 | 8 => rng.below(uapi::RVMM_MAX_MEMSLOTS.into()) as u32,
        _ => rng.pick(&[32, 33, 255, 1000, 0x8000_0000, u32::MAX]),
    };
    let flags = match rng.below(10) {
        0..=5 => 0,
        6..=8 => uapi::RVMM_MEM_READONLY,
        _ => rng.interesting_u32(),
    };
    let memory_size = match rng.below(12) {
        0 | 1 => 0,
        2..=5 => rng.range(1, 16) * 4096,
        6 => RAM_SIZE as u64,
        7 => rng.range(1, (RAM_SIZE / 4096) as u64) * 4096,
        8 => RAM_SIZE as u64 + 4096,
        9 => rng.range(1, 0x1_0000),
        10 => rng.pick(&[
            1 << 32,
            1 << 34,
            (1 << 34) + 4096,
            1 << 40,
            1 << 46,
            !0xfffu64,
            u64::MAX,
        ]),
        _ => rng.interesting_u64(),
    };
    let guest_phys_addr = match rng.below(12) {
        0..=2 => 0,
        3 => 0x10_0000,
        4 => 0x20_0000,
        5 => 0xa_0000,
        6 => 0xd000_0000,
        7 => 0xfee0_0000,
        8 => 0xffff_0000,
        9 => rng.below(1 << 20) << 12,
        10 => rng.pick(&[(1 << 46) - 4096, 1 << 46, !0xfffu64, 1 << 36, 1 << 39]),
        _ => rng.below(1 << 32),
    };
    uapi::MemoryRegion {
        slot,
        flags,
        guest_phys_addr,
        memory_size,
        userspace_addr: region_uaddr(rng, env, memory_size),
    }
}

/// An address the kernel must refuse (EFAULT): NULL, kernel, non-canonical, unmapped,
/// or straddling the end of the scratch area into its guard page.
pub fn bad_addr(rng: &mut Rng, env: &Env) -> usize {
    match rng.below(4) {
        0 => rng.pick(BAD_ADDRS) as usize,
        1 => env.hole.0 + rng.index(env.hole.1),
        2 => env.mem.guard - rng.range(1, 64) as usize,
        _ => (rng.pick(BAD_ADDRS) as usize).wrapping_add(rng.index(4096)),
    }
}

/// General registers: boundary values, with RIP and RSP mostly in guest RAM.
pub fn regs(rng: &mut Rng) -> Regs {
    let mut v = [0u64; 18];
    for x in v.iter_mut() {
        *x = if rng.bool() {
            rng.below(RAM_SIZE as u64)
        } else {
            rng.interesting_u64()
        };
    }
    let mut r = Regs {
        rax: v[0],
        rbx: v[1],
        rcx: v[2],
        rdx: v[3],
        rsi: v[4],
        rdi: v[5],
        rsp: v[6],
        rbp: v[7],
        r8: v[8],
        r9: v[9],
        r10: v[10],
        r11: v[11],
        r12: v[12],
        r13: v[13],
        r14: v[14],
        r15: v[15],
        rip: v[16],
        rflags: v[17],
    };
    if rng.pct(70) {
        r.rflags = 2 | if rng.bool() { 0x200 } else { 0 };
    }
    r
}

/// Flips one thing in `r`: a flag of RFLAGS, RIP, RSP or a general register.
pub fn mutate_regs(rng: &mut Rng, r: &mut Regs) {
    match rng.below(5) {
        0 => {
            r.rflags ^= 1
                << rng.pick(&[
                    0u32, 1, 2, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 40,
                ])
        }
        1 => r.rip = rng.interesting_u64(),
        2 => r.rsp = rng.interesting_u64(),
        3 => r.rflags = rng.interesting_u64(),
        _ => r.rax = rng.interesting_u64(),
    }
}

/// Changes one field of `s`: a control register bit, EFER, a segment's field, a
/// descriptor table.
pub fn mutate_sregs(rng: &mut Rng, s: &mut Sregs) {
    match rng.below(12) {
        0 | 1 => s.cr0 ^= 1 << rng.pick(&[0u32, 1, 2, 3, 4, 5, 16, 18, 29, 30, 31, 7, 40]),
        2 | 3 => s.cr4 ^= 1 << rng.below(25),
        4 => {
            let any = 1 << rng.below(64);
            s.efer ^= rng.pick(&[1u64, 0x100, 0x400, 0x800, 0x1000, 0x2000, 0x4000, any]);
        }
        5 => {
            s.cr3 = match rng.below(3) {
                0 => rng.below(RAM_SIZE as u64) & !0xfff,
                1 => rng.below(RAM_SIZE as u64),
                _ => rng.interesting_u64(),
            }
        }
        6 => {
            s.cr2 = rng.interesting_u64();
            s.cr8 = rng.interesting_u64();
        }
        7 => s.apic_base = rng.interesting_u64(),
        8 => {
            let t = if rng.bool() { &mut s.gdt } else { &mut s.idt };
            if rng.bool() {
                t.base = rng.interesting_u64();
            } else {
                t.limit = rng.u16();
            }
        }
        _ => {
            let seg = match rng.below(8) {
                0 => &mut s.cs,
                1 => &mut s.ds,
                2 => &mut s.es,
                3 => &mut s.fs,
                4 => &mut s.gs,
                5 => &mut s.ss,
                6 => &mut s.tr,
                _ => &mut s.ldt,
            };
            match rng.below(11) {
                0 => seg.base = rng.interesting_u64(),
                1 => seg.limit = rng.interesting_u32(),
                2 => seg.selector = rng.u16(),
                3 => seg.seg_type = rng.u8() & if rng.pct(80) { 0xf } else { 0xff },
                4 => seg.present ^= 1,
                5 => seg.dpl = rng.u8() & 3,
                6 => seg.db ^= 1,
                7 => seg.s ^= 1,
                8 => seg.l ^= 1,
                9 => seg.unusable ^= 1,
                _ => {
                    seg.g = rng.u8();
                    seg.avl = rng.u8();
                    seg.padding = rng.u8();
                }
            }
        }
    }
}

/// Special registers: a working mode (protected, long, real) with a few fields
/// changed, or many.
pub fn sregs(rng: &mut Rng, tpl: &Templates) -> Sregs {
    let mut s = match rng.below(4) {
        0 => tpl.protected,
        1 => tpl.long,
        2 => real_mode(VCPU_AREA + rng.below(8) * AREA_SIZE),
        _ => Sregs::default(),
    };
    for _ in 0..rng.below(12) {
        mutate_sregs(rng, &mut s);
    }
    s
}

/// Exceptions that push an error code.
pub fn has_error_code(vector: u32) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// `RVMM_INTERRUPT`: interrupts and exceptions, valid and not.
pub fn interrupt(rng: &mut Rng, vcpu: u32) -> uapi::Interrupt {
    let kind = match rng.below(20) {
        0..=8 => uapi::RVMM_EVENT_INTERRUPT,
        9..=17 => uapi::RVMM_EVENT_EXCEPTION,
        _ => rng.interesting_u32(),
    };
    let vector = match (kind, rng.pct(75)) {
        (uapi::RVMM_EVENT_INTERRUPT, true) => rng.range(32, 255) as u32,
        (uapi::RVMM_EVENT_EXCEPTION, true) => rng.below(32) as u32,
        _ => rng.interesting_u32(),
    };
    let has = if rng.pct(80) {
        has_error_code(vector)
    } else {
        rng.bool()
    };
    uapi::Interrupt {
        vcpu,
        kind,
        vector,
        has_error_code: if rng.pct(95) {
            u32::from(has)
        } else {
            rng.interesting_u32()
        },
        error_code: rng.interesting_u32(),
        padding: mostly_zero(rng),
    }
}

/// `RVMM_SET_SHADOW_LIMITS`: small pools (a large one is a lot of kernel memory in a
/// 256-MiB machine), and values out of range.
pub fn shadow_limits(rng: &mut Rng) -> uapi::ShadowLimits {
    uapi::ShadowLimits {
        pages: rng.pick(&[
            0,
            1,
            63,
            64,
            65,
            100,
            128,
            256,
            512,
            1024,
            2048,
            65537,
            1 << 31,
            u32::MAX,
        ]),
        roots: rng.pick(&[0, 1, 2, 3, 4, 8, 16, 63, 64, 65, 1000, u32::MAX]),
    }
}

/// `RVMM_SET_CPUID`: up to and past the entry limit.
pub fn cpuid(rng: &mut Rng, vcpu: u32) -> uapi::Cpuid {
    let mut c = uapi::Cpuid {
        vcpu,
        nent: match rng.below(10) {
            0..=6 => rng.below(uapi::RVMM_MAX_CPUID_ENTRIES as u64 + 1) as u32,
            7 => uapi::RVMM_MAX_CPUID_ENTRIES as u32,
            _ => rng.interesting_u32(),
        },
        ..Default::default()
    };
    for e in c.entries.iter_mut() {
        let any = rng.u32();
        *e = uapi::CpuidEntry {
            function: rng.pick(&[
                0,
                1,
                2,
                4,
                6,
                7,
                0xa,
                0xb,
                0xd,
                0x14,
                0x1f,
                0x4000_0000,
                0x4000_0001,
                0x8000_0000,
                0x8000_0001,
                0x8000_0007,
                0x8000_0008,
                any,
            ]),
            index: rng.below(4) as u32,
            flags: if rng.pct(90) {
                rng.below(2) as u32
            } else {
                rng.u32()
            },
            eax: rng.interesting_u32(),
            ebx: rng.interesting_u32(),
            ecx: rng.interesting_u32(),
            edx: rng.interesting_u32(),
            padding: mostly_zero(rng),
        };
    }
    c
}

/// A value for an MSR: canonical addresses, boundaries, PAT-like patterns.
fn msr_value(rng: &mut Rng) -> u64 {
    match rng.below(5) {
        0 => 0xffff_8000_0000_0000 | rng.below(1 << 40),
        1 => 0x0007_0406_0007_0406,
        2 => rng.below(RAM_SIZE as u64),
        _ => rng.interesting_u64(),
    }
}

/// `RVMM_GET_MSRS` / `RVMM_SET_MSRS`.
pub fn msrs(rng: &mut Rng, vcpu: u32) -> uapi::Msrs {
    let mut m = uapi::Msrs {
        vcpu,
        nmsrs: if rng.pct(85) {
            rng.below(uapi::RVMM_MAX_MSR_ENTRIES as u64 + 1) as u32
        } else {
            rng.interesting_u32()
        },
        ..Default::default()
    };
    for e in m.entries.iter_mut() {
        *e = uapi::MsrEntry {
            index: if rng.pct(85) {
                rng.pick(MSRS)
            } else {
                rng.interesting_u32()
            },
            reserved: mostly_zero(rng),
            data: msr_value(rng),
        };
    }
    m
}

/// `RVMM_SIGNAL_MSI`: every delivery mode to every destination, and non-APIC addresses.
pub fn msi(rng: &mut Rng) -> uapi::Msi {
    let address = if rng.pct(75) {
        0xfee0_0000 | (u64::from(rng.u8()) << 12) | (rng.below(4) << 2)
    } else {
        rng.pick(&[
            0,
            0xfed0_0000,
            0xfef0_0000,
            0xfee0_0000 | 0xfff,
            u64::MAX,
            0x1_fee0_0000,
        ])
    };
    let mut data = u32::from(rng.u8()) | ((rng.below(8) as u32) << 8);
    if rng.bool() {
        data |= 1 << 14;
    }
    if rng.bool() {
        data |= 1 << 15;
    }
    if rng.pct(10) {
        data = rng.interesting_u32();
    }
    uapi::Msi {
        address,
        data,
        flags: mostly_zero(rng),
    }
}

/// `RVMM_SET_MP_STATE`.
pub fn mp_state(rng: &mut Rng, vcpu: u32) -> uapi::MpState {
    uapi::MpState {
        vcpu,
        state: match rng.below(10) {
            0..=4 => uapi::RVMM_MP_STATE_RUNNABLE,
            5..=8 => uapi::RVMM_MP_STATE_WAIT_SIPI,
            _ => rng.interesting_u32(),
        },
    }
}

/// Instructions a guest program is made of (32-bit encodings; in 16- and 64-bit modes
/// they decode as something else, which is as good).
const SNIPPETS: &[&[u8]] = &[
    &[0xf4],                                                       // hlt
    &[0xef],                                                       // out dx, eax
    &[0xed],                                                       // in eax, dx
    &[0xee],                                                       // out dx, al
    &[0xec],                                                       // in al, dx
    &[0x66, 0xef],                                                 // out dx, ax
    &[0x0f, 0xa2],                                                 // cpuid
    &[0x0f, 0x32],                                                 // rdmsr
    &[0x0f, 0x30],                                                 // wrmsr
    &[0x0f, 0x31],                                                 // rdtsc
    &[0x0f, 0x01, 0xf9],                                           // rdtscp
    &[0x0f, 0x01, 0xc1],                                           // vmcall
    &[0x0f, 0x01, 0xd9],                                           // vmmcall
    &[0x0f, 0x0b],                                                 // ud2
    &[0xcc],                                                       // int3
    &[0xce],                                                       // into
    &[0xf1],                                                       // int1
    &[0xfa],                                                       // cli
    &[0xfb],                                                       // sti
    &[0x9c],                                                       // pushf
    &[0x9d],                                                       // popf
    &[0xcf],                                                       // iret
    &[0x0f, 0x20, 0xc0],                                           // mov eax, cr0
    &[0x0f, 0x22, 0xc0],                                           // mov cr0, eax
    &[0x0f, 0x20, 0xd8],                                           // mov eax, cr3
    &[0x0f, 0x22, 0xd8],                                           // mov cr3, eax
    &[0x0f, 0x20, 0xe0],                                           // mov eax, cr4
    &[0x0f, 0x22, 0xe0],                                           // mov cr4, eax
    &[0x0f, 0x22, 0xd0],                                           // mov cr2, eax
    &[0x44, 0x0f, 0x22, 0xc0],                                     // mov cr8, rax (64-bit)
    &[0x0f, 0x01, 0x38],                                           // invlpg [eax]
    &[0x0f, 0x01, 0x10],                                           // lgdt [eax]
    &[0x0f, 0x01, 0x18],                                           // lidt [eax]
    &[0x0f, 0x01, 0x00],                                           // sgdt [eax]
    &[0x0f, 0x00, 0xd8],                                           // ltr ax
    &[0x0f, 0x00, 0xd0],                                           // lldt ax
    &[0x0f, 0x00, 0xc8],                                           // str ax
    &[0x8e, 0xd8],                                                 // mov ds, ax
    &[0x8e, 0xd0],                                                 // mov ss, ax
    &[0x8e, 0xe0],                                                 // mov fs, ax
    &[0x89, 0x00],                                                 // mov [eax], eax
    &[0x8b, 0x00],                                                 // mov eax, [eax]
    &[0x88, 0x08],                                                 // mov [eax], cl
    &[0x66, 0x89, 0x08],                                           // mov [eax], cx
    &[0x87, 0x08],                                                 // xchg [eax], ecx
    &[0xf0, 0x0f, 0xc1, 0x08],                                     // lock xadd [eax], ecx
    &[0x0f, 0xc7, 0x08],                                           // cmpxchg8b [eax]
    &[0xf3, 0x6e],                                                 // rep outsb
    &[0xf3, 0x6c],                                                 // rep insb
    &[0xf3, 0xa4],                                                 // rep movsb
    &[0xf3, 0xab],                                                 // rep stosd
    &[0x6f],                                                       // outsd
    &[0x6d],                                                       // insd
    &[0x0f, 0x09],                                                 // wbinvd
    &[0x0f, 0x08],                                                 // invd
    &[0xf3, 0x90],                                                 // pause
    &[0x0f, 0x01, 0xc8],                                           // monitor
    &[0x0f, 0x01, 0xc9],                                           // mwait
    &[0x0f, 0x01, 0xd1],                                           // xsetbv
    &[0x0f, 0x01, 0xd0],                                           // xgetbv
    &[0x0f, 0x33],                                                 // rdpmc
    &[0x0f, 0x23, 0xf8],                                           // mov dr7, eax
    &[0x0f, 0x21, 0xf0],                                           // mov eax, dr6
    &[0x0f, 0x23, 0xc0],                                           // mov dr0, eax
    &[0x0f, 0x05],                                                 // syscall
    &[0x0f, 0x07],                                                 // sysret
    &[0x0f, 0x34],                                                 // sysenter
    &[0x0f, 0x35],                                                 // sysexit
    &[0x0f, 0x01, 0xf0],                                           // lmsw ax
    &[0x0f, 0x06],                                                 // clts
    &[0x0f, 0x01, 0xe0],                                           // smsw eax
    &[0x0f, 0x01, 0xc4],                                           // vmxoff
    &[0x0f, 0x01, 0xc2],                                           // vmlaunch
    &[0x0f, 0x01, 0xc3],                                           // vmresume
    &[0xf3, 0x0f, 0xc7, 0x30],                                     // vmxon [eax]
    &[0x0f, 0xc7, 0x30],                                           // vmptrld [eax]
    &[0x0f, 0x78, 0xc0],                                           // vmread eax, eax
    &[0x0f, 0x79, 0xc0],                                           // vmwrite eax, eax
    &[0x66, 0x0f, 0x38, 0x80, 0x00],                               // invept
    &[0x66, 0x0f, 0x38, 0x81, 0x00],                               // invvpid
    &[0x66, 0x0f, 0x38, 0x82, 0x00],                               // invpcid
    &[0x0f, 0x37],                                                 // getsec
    &[0x0f, 0xae, 0x00],                                           // fxsave [eax]
    &[0x0f, 0xae, 0x08],                                           // fxrstor [eax]
    &[0x0f, 0xae, 0x20],                                           // xsave [eax]
    &[0x0f, 0xae, 0x28],                                           // xrstor [eax]
    &[0xdb, 0xe3],                                                 // fninit
    &[0x0f, 0xae, 0x10],                                           // ldmxcsr [eax]
    &[0xc7, 0x05, 0x00, 0x00, 0x00, 0xd0, 0x78, 0x56, 0x34, 0x12], // MMIO store
    &[0x8b, 0x05, 0x04, 0x00, 0x00, 0xd0],                         // MMIO load
    &[0xa1, 0x20, 0x00, 0xe0, 0xfe],                               // mov eax, [APIC ID]
    &[0xa3, 0xb0, 0x00, 0xe0, 0xfe],                               // mov [APIC EOI], eax
    &[0xa3, 0x00, 0x03, 0xe0, 0xfe],                               // mov [APIC ICR low], eax
    &[0xa3, 0x80, 0x03, 0xe0, 0xfe], // mov [APIC timer initial count], eax
    &[0xcb],                         // retf
    &[0xc3],                         // ret
    &[0x0f, 0xc7, 0xf0],             // rdrand eax
    &[0x0f, 0x01, 0xd4],             // vmfunc
    &[0x0f, 0x01, 0xca],             // clac
    &[0x0f, 0x01, 0xcb],             // stac
    &[0xe2, 0xfe],                   // loop $
    &[0xeb, 0xfe],                   // jmp $
    &[0x90],                         // nop
];

/// Values for a register a snippet uses: addresses of page tables, MMIO, the APIC,
/// RAM, this vCPU's area, or anything.
fn guest_value(rng: &mut Rng, area: u64) -> u32 {
    (match rng.below(9) {
        0 => area + rng.below(AREA_SIZE),
        1 => 0x1000 + rng.below(0x6000),
        2 => 0xd000_0000 + rng.below(0x1000),
        3 => 0xfee0_0000 + (rng.below(0x400) & !0xf),
        4 => 0xfec0_0000,
        5 => rng.below(RAM_SIZE as u64),
        6 => rng.pick(&[
            0x3f8, 0xcf8, 0xcfc, 0x70, 0x71, 0x20, 0x21, 0x40, 0x43, 0x60, 0x64, 0x80, 0x92, 0xf4,
            0xf5, 0x402,
        ]),
        7 => u64::from(rng.pick(MSRS)),
        _ => u64::from(rng.interesting_u32()),
    }) as u32
}

/// A random guest program for the vCPU whose area starts at `area`.
pub fn code(rng: &mut Rng, area: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(512);
    if rng.pct(20) {
        let mut raw = vec![0u8; rng.range(1, 256) as usize];
        rng.fill(&mut raw);
        return raw;
    }
    for _ in 0..rng.range(1, 32) {
        match rng.below(20) {
            0..=6 => {
                // mov r32, imm32 (eax, ecx, edx, ebx, esi, edi)
                c.push(0xb8 + rng.pick(&[0u8, 1, 2, 3, 6, 7]));
                c.extend_from_slice(&guest_value(rng, area).to_le_bytes());
            }
            7 => {
                // out/in imm8
                c.push(rng.pick(&[0xe6, 0xe4, 0xe7, 0xe5]));
                let any = rng.u8();
                c.push(rng.pick(&[
                    0x20, 0x21, 0x40, 0x43, 0x60, 0x61, 0x64, 0x70, 0x71, 0x80, 0xf4, 0xf5, 0x92,
                    any,
                ]));
            }
            8 => {
                // int imm8
                c.extend_from_slice(&[0xcd, rng.u8()]);
            }
            9 => {
                // jmp far sel:off
                c.push(0xea);
                c.extend_from_slice(&((area + rng.below(0x100)) as u32).to_le_bytes());
                let any = rng.u16();
                c.extend_from_slice(&rng.pick(&[0x8u16, 0x10, 0x18, 0x20, 0, any]).to_le_bytes());
            }
            10 => {
                // a prefix or two, then a snippet
                for _ in 0..rng.range(1, 2) {
                    c.push(rng.pick(&[
                        0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x2e, 0x26, 0x64, 0x65, 0x48, 0x41,
                    ]));
                }
                c.extend_from_slice(rng.pick(SNIPPETS));
            }
            11 => {
                let mut raw = [0u8; 8];
                rng.fill(&mut raw);
                c.extend_from_slice(&raw[..rng.range(1, 8) as usize]);
            }
            _ => c.extend_from_slice(rng.pick(SNIPPETS)),
        }
    }
    match rng.below(6) {
        0 | 1 => c.push(0xf4),
        2 => c.extend_from_slice(&[0xeb, 0xfe]),
        3 => {
            // jmp back to the start (a loop)
            let back = -(c.len() as i64 + 5);
            c.push(0xe9);
            c.extend_from_slice(&(back as i32).to_le_bytes());
        }
        4 => c.extend_from_slice(&[0xb0, rng.u8(), 0xe6, 0xf4, 0xf4]),
        _ => {} // falls through into whatever follows
    }
    c.truncate(0xf00);
    c
}

/// A random page-table entry: empty, garbage, a page of RAM with random flags, a bit
/// flipped, a page table pointing at the page tables, a huge page anywhere.
pub fn pte(rng: &mut Rng, old: u64, tables: u64) -> u64 {
    match rng.below(7) {
        0 => 0,
        1 => rng.next_u64(),
        2 => (rng.below((RAM_SIZE / 4096) as u64) << 12) | rng.below(0x1000),
        3 | 4 => old ^ (1 << rng.below(64)),
        5 => tables | 0x7,
        _ => (rng.below(1 << 24) << 12) | 0x83,
    }
}

/// Writes into guest RAM (`ram` is the host address of guest-physical 0).
pub fn poke(ram: (usize, usize), gpa: u64, bytes: &[u8]) {
    let Some(end) = gpa.checked_add(bytes.len() as u64) else {
        return;
    };
    if ram.0 == 0 || end > ram.1 as u64 {
        return;
    }
    // SAFETY: in bounds of the RAM mapping, which the caller keeps mapped; guests may
    // write these bytes concurrently, which only makes them random.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (ram.0 + gpa as usize) as *mut u8,
            bytes.len(),
        )
    };
}

/// Reads a u64 of guest RAM (0 outside it).
pub fn peek_u64(ram: (usize, usize), gpa: u64) -> u64 {
    if ram.0 == 0 || gpa.saturating_add(8) > ram.1 as u64 {
        return 0;
    }
    // SAFETY: in bounds of the RAM mapping the caller keeps mapped.
    unsafe { std::ptr::read_volatile((ram.0 + gpa as usize) as *const u64) }
}

/// How a guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Protected,
    Long,
    Real,
    Paging32,
    Pae,
    LongOwnTables,
    Wild,
}

const MODES: &[Mode] = &[
    Mode::Protected,
    Mode::Long,
    Mode::Real,
    Mode::Paging32,
    Mode::Pae,
    Mode::LongOwnTables,
    Mode::Wild,
];

fn gate32(handler: u64, sel: u64) -> u64 {
    (handler & 0xffff) | (sel << 16) | (0x8e00u64 << 32) | ((handler >> 16) << 48)
}

/// Builds a random guest for vCPU `id` in `ram`: code, IDT, page tables in the vCPU's
/// area, and returns the registers to start it with.
pub fn guest(rng: &mut Rng, ram: (usize, usize), id: u32, tpl: &Templates) -> (Mode, Regs, Sregs) {
    let area = VCPU_AREA + u64::from(id % 8) * AREA_SIZE;
    let mode = rng.pick(MODES);
    if rng.pct(15) {
        // Repair the shared GDT and long-mode tables (guests and the fuzzer wreck them).
        poke(ram, 0, &tpl.image);
    }
    poke(ram, area, &code(rng, area));
    let handler = area + 0xf00;
    poke(ram, handler, &[0xb0, rng.u8(), 0xe6, 0xf5, 0xf4, 0xcf]);
    let idt = area + 0x1000;
    let tables = area + 0x4000;
    let (mut s, rip, rsp) = match mode {
        Mode::Real => {
            for v in 0..256u64 {
                let seg = (area >> 4) as u32;
                let ent = (0xf00u32 | (seg << 16)).to_le_bytes();
                poke(ram, v * 4, &ent);
            }
            (real_mode(area), 0, 0xfff0)
        }
        Mode::Long | Mode::LongOwnTables => {
            for v in 0..256u64 {
                let lo = gate32(handler, 0x8);
                let mut g = [0u8; 16];
                g[..8].copy_from_slice(&lo.to_le_bytes());
                g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
                poke(ram, idt + v * 16, &g);
            }
            let mut s = tpl.long;
            if mode == Mode::LongOwnTables {
                poke(ram, tables, &((tables + 0x1000) | 3).to_le_bytes());
                poke(ram, tables + 0x1000, &((tables + 0x2000) | 3).to_le_bytes());
                poke(ram, tables + 0x2000, &0x83u64.to_le_bytes());
                poke(ram, tables + 0x2008, &((tables + 0x3000) | 3).to_le_bytes());
                for i in 0..512u64 {
                    poke(
                        ram,
                        tables + 0x3000 + 8 * i,
                        &(((1 << 21) + (i << 12)) | 3).to_le_bytes(),
                    );
                }
                s.cr3 = tables;
            }
            s.idt = Dtable {
                base: idt,
                limit: 0xfff,
                padding: [0; 3],
            };
            (s, area, area + 0xfff0)
        }
        _ => {
            for v in 0..256u64 {
                poke(ram, idt + v * 8, &gate32(handler, 0x18).to_le_bytes());
            }
            let mut s = tpl.protected;
            s.idt = Dtable {
                base: idt,
                limit: 0x7ff,
                padding: [0; 3],
            };
            match mode {
                Mode::Paging32 => {
                    if rng.bool() {
                        poke(ram, tables, &0x83u32.to_le_bytes());
                        s.cr4 |= CR4_PSE;
                    } else {
                        poke(ram, tables, &((tables + 0x1000) as u32 | 3).to_le_bytes());
                        for i in 0..1024u64 {
                            poke(
                                ram,
                                tables + 0x1000 + 4 * i,
                                &((i << 12) as u32 | 3).to_le_bytes(),
                            );
                        }
                    }
                    s.cr0 = CR0_PG | CR0_ET | CR0_PE;
                    s.cr3 = tables;
                }
                Mode::Pae => {
                    poke(ram, tables, &((tables + 0x1000) | 1).to_le_bytes());
                    poke(ram, tables + 0x1000, &0x83u64.to_le_bytes());
                    poke(ram, tables + 0x1008, &((tables + 0x2000) | 3).to_le_bytes());
                    s.cr4 |= CR4_PAE;
                    s.cr0 = CR0_PG | CR0_ET | CR0_PE;
                    s.cr3 = tables;
                }
                Mode::Wild => {
                    s = sregs(rng, tpl);
                    for _ in 0..rng.range(3, 20) {
                        mutate_sregs(rng, &mut s);
                    }
                }
                _ => {}
            }
            (s, area, area + 0xfff0)
        }
    };
    // Random page-table entries: the vCPU's own tables, or the shared long-mode ones.
    let (pt_base, pt_len) = match mode {
        Mode::Long => (0x1000, 0x6000),
        Mode::Paging32 | Mode::Pae | Mode::LongOwnTables => (tables, 0x4000),
        _ => (0, 0),
    };
    if pt_len != 0 && rng.pct(50) {
        for _ in 0..rng.range(1, 8) {
            let at = pt_base + rng.below(pt_len / 8) * 8;
            let table = pt_base + rng.below(pt_len / 4096) * 4096;
            let v = pte(rng, peek_u64(ram, at), table);
            poke(ram, at, &v.to_le_bytes());
        }
    }
    if mode != Mode::Wild && rng.pct(40) {
        for _ in 0..rng.range(1, 3) {
            mutate_sregs(rng, &mut s);
        }
    }
    let mut r = Regs {
        rip,
        rsp,
        rflags: 2 | if rng.bool() { 0x200 } else { 0 },
        rax: u64::from(guest_value(rng, area)),
        rcx: u64::from(guest_value(rng, area)),
        rdx: u64::from(guest_value(rng, area)),
        rsi: u64::from(guest_value(rng, area)),
        rdi: u64::from(guest_value(rng, area)),
        ..Default::default()
    };
    if rng.pct(20) {
        mutate_regs(rng, &mut r);
    }
    (mode, r, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_fit_their_area() {
        let mut rng = Rng::new(5);
        for _ in 0..2000 {
            let c = code(&mut rng, VCPU_AREA);
            assert!(!c.is_empty() && c.len() <= 0xf00);
        }
    }

    #[test]
    fn real_mode_segments_match_their_base() {
        let s = real_mode(0x5_0000);
        assert_eq!(s.cs.selector, 0x5000);
        assert_eq!(s.ss.base, 0x5_0000);
        assert_eq!(s.cr0 & CR0_PE, 0);
    }

    #[test]
    fn gates_encode_handler_and_selector() {
        let g = gate32(0x0004_1f00, 0x18);
        assert_eq!(g & 0xffff, 0x1f00);
        assert_eq!((g >> 16) & 0xffff, 0x18);
        assert_eq!(g >> 48, 0x0004);
        assert_eq!((g >> 40) & 0xff, 0x8e);
    }

    #[test]
    fn error_code_vectors() {
        assert!(has_error_code(13) && has_error_code(14) && !has_error_code(6));
    }

    #[test]
    fn guests_stay_in_ram() {
        let mut mem = vec![0u8; RAM_SIZE];
        let ram = (mem.as_mut_ptr() as usize, mem.len());
        let tpl = Templates::new().unwrap();
        let mut rng = Rng::new(11);
        let mut modes = std::collections::HashSet::new();
        for i in 0..500 {
            let (mode, _, _) = guest(&mut rng, ram, i % 8, &tpl);
            modes.insert(format!("{mode:?}"));
        }
        assert_eq!(modes.len(), MODES.len());
        // poke refuses to write past the end.
        poke(ram, RAM_SIZE as u64 - 2, &[1, 2, 3, 4]);
        assert_eq!(mem[RAM_SIZE - 2], 0);
    }
}
