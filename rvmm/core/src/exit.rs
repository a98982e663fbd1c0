// SPDX-License-Identifier: GPL-2.0

//! VM-exit decoding (SDM Vol. 3D, Appendix C; Vol. 3C, 28.2): basic exit reasons and
//! the exit qualifications rvmm handles.

/// Basic exit reasons rvmm knows (bits 15:0 of the exit-reason field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ExitReason {
    /// Exception or NMI.
    ExceptionNmi = 0,
    /// External interrupt.
    ExternalInterrupt = 1,
    /// Triple fault.
    TripleFault = 2,
    /// INIT signal.
    Init = 3,
    /// Interrupt window.
    InterruptWindow = 7,
    /// NMI window.
    NmiWindow = 8,
    /// Task switch.
    TaskSwitch = 9,
    /// CPUID.
    Cpuid = 10,
    /// HLT.
    Hlt = 12,
    /// INVD.
    Invd = 13,
    /// INVLPG.
    Invlpg = 14,
    /// RDPMC.
    Rdpmc = 15,
    /// RDTSC.
    Rdtsc = 16,
    /// VMCALL.
    Vmcall = 18,
    /// VMCLEAR.
    Vmclear = 19,
    /// VMLAUNCH.
    Vmlaunch = 20,
    /// VMPTRLD.
    Vmptrld = 21,
    /// VMPTRST.
    Vmptrst = 22,
    /// VMREAD.
    Vmread = 23,
    /// VMRESUME.
    Vmresume = 24,
    /// VMWRITE.
    Vmwrite = 25,
    /// VMXOFF.
    Vmxoff = 26,
    /// VMXON.
    Vmxon = 27,
    /// Control-register access.
    CrAccess = 28,
    /// MOV DR.
    DrAccess = 29,
    /// I/O instruction.
    Io = 30,
    /// RDMSR.
    Rdmsr = 31,
    /// WRMSR.
    Wrmsr = 32,
    /// VM entry failed: invalid guest state.
    InvalidGuestState = 33,
    /// VM entry failed: MSR loading.
    MsrLoadFail = 34,
    /// MWAIT.
    Mwait = 36,
    /// Monitor trap flag.
    MonitorTrap = 37,
    /// MONITOR.
    Monitor = 39,
    /// PAUSE.
    Pause = 40,
    /// VM entry failed: machine-check event.
    MachineCheckEntry = 41,
    /// TPR below threshold.
    TprBelowThreshold = 43,
    /// An access to the APIC-access page that VMX does not virtualize.
    ApicAccess = 44,
    /// GDTR/IDTR access.
    DtAccess = 46,
    /// LDTR/TR access.
    TrAccess = 47,
    /// INVEPT.
    Invept = 50,
    /// RDTSCP.
    Rdtscp = 51,
    /// VMX-preemption timer expired.
    PreemptionTimer = 52,
    /// INVVPID.
    Invvpid = 53,
    /// WBINVD.
    Wbinvd = 54,
    /// XSETBV.
    Xsetbv = 55,
    /// APIC write: a write to the APIC-access page that software completes (trap-like).
    ApicWrite = 56,
    /// INVPCID.
    Invpcid = 58,
    /// VMFUNC.
    Vmfunc = 59,
    /// RDRAND.
    Rdrand = 57,
    /// RDSEED.
    Rdseed = 61,
    /// XSAVES.
    Xsaves = 63,
    /// XRSTORS.
    Xrstors = 64,
}

/// Number of basic exit reasons the counters track.
pub const NR_EXIT_REASONS: usize = 72;

impl ExitReason {
    /// Decodes the basic exit reason (bits 15:0).
    pub fn from_basic(basic: u16) -> Option<Self> {
        use ExitReason::*;
        const ALL: &[ExitReason] = &[
            ExceptionNmi,
            ExternalInterrupt,
            TripleFault,
            Init,
            InterruptWindow,
            NmiWindow,
            TaskSwitch,
            Cpuid,
            Hlt,
            Invd,
            Invlpg,
            Rdpmc,
            Rdtsc,
            Vmcall,
            Vmclear,
            Vmlaunch,
            Vmptrld,
            Vmptrst,
            Vmread,
            Vmresume,
            Vmwrite,
            Vmxoff,
            Vmxon,
            CrAccess,
            DrAccess,
            Io,
            Rdmsr,
            Wrmsr,
            InvalidGuestState,
            MsrLoadFail,
            Mwait,
            MonitorTrap,
            Monitor,
            Pause,
            MachineCheckEntry,
            TprBelowThreshold,
            ApicAccess,
            DtAccess,
            TrAccess,
            Invept,
            Rdtscp,
            PreemptionTimer,
            Invvpid,
            Wbinvd,
            Xsetbv,
            ApicWrite,
            Invpcid,
            Vmfunc,
            Rdrand,
            Rdseed,
            Xsaves,
            Xrstors,
        ];
        ALL.iter().copied().find(|r| *r as u16 == basic)
    }
}

impl ExitReason {
    /// The SDM's name, for reports.
    pub const fn name(self) -> &'static str {
        use ExitReason::*;
        match self {
            ExceptionNmi => "exception/NMI",
            ExternalInterrupt => "external interrupt",
            TripleFault => "triple fault",
            Init => "INIT",
            InterruptWindow => "interrupt window",
            NmiWindow => "NMI window",
            TaskSwitch => "task switch",
            Cpuid => "CPUID",
            Hlt => "HLT",
            Invd => "INVD",
            Invlpg => "INVLPG",
            Rdpmc => "RDPMC",
            Rdtsc => "RDTSC",
            Vmcall => "VMCALL",
            Vmclear | Vmlaunch | Vmptrld | Vmptrst | Vmread | Vmresume | Vmwrite | Vmxoff
            | Vmxon | Invept | Invvpid | Vmfunc => "VMX instruction",
            CrAccess => "CR access",
            DrAccess => "DR access",
            Io => "I/O instruction",
            Rdmsr => "RDMSR",
            Wrmsr => "WRMSR",
            InvalidGuestState => "invalid guest state",
            MsrLoadFail => "MSR load failure",
            Mwait => "MWAIT",
            MonitorTrap => "monitor trap flag",
            Monitor => "MONITOR",
            Pause => "PAUSE",
            MachineCheckEntry => "machine check at entry",
            TprBelowThreshold => "TPR below threshold",
            ApicAccess => "APIC access",
            ApicWrite => "APIC write",
            DtAccess => "GDTR/IDTR access",
            TrAccess => "LDTR/TR access",
            Rdtscp => "RDTSCP",
            PreemptionTimer => "preemption timer",
            Wbinvd => "WBINVD",
            Xsetbv => "XSETBV",
            Invpcid => "INVPCID",
            Rdrand => "RDRAND",
            Rdseed => "RDSEED",
            Xsaves => "XSAVES",
            Xrstors => "XRSTORS",
        }
    }
}

/// Bit 31 of the exit-reason field: the VM entry failed.
pub const EXIT_REASON_FAILED_ENTRY: u32 = 1 << 31;

/// Exit qualification of an APIC-access exit (SDM Vol. 3C, Table 28-6): how the
/// APIC-access page was reached, and for a linear access the page offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicAccessQual {
    /// A data read by an instruction, at this offset.
    Read(u16),
    /// A data write by an instruction, at this offset.
    Write(u16),
    /// An instruction fetch.
    Fetch,
    /// A linear access while delivering an event (its IDT, stack or TSS on the page).
    EventDelivery,
    /// A guest-physical access (with EPT only), or a reserved encoding.
    Other,
}

impl ApicAccessQual {
    /// Decodes bits 15:12 (access type) and 11:0 (offset).
    pub const fn decode(qual: u64) -> Self {
        let offset = (qual & 0xfff) as u16;
        match (qual >> 12) & 0xf {
            0 => Self::Read(offset),
            1 => Self::Write(offset),
            2 => Self::Fetch,
            3 => Self::EventDelivery,
            _ => Self::Other,
        }
    }
}

/// Exit qualification of an APIC-write exit: the offset of the register written, whose
/// new value is in the virtual-APIC page (bits 11:0; the SDM aligns it to the
/// register's 16 bytes).
pub const fn apic_write_offset(qual: u64) -> u32 {
    (qual & 0xff0) as u32
}

/// Exit qualification of a control-register access (SDM Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CRn from a general register.
    MovTo {
        /// CR number.
        cr: u8,
        /// General register (0 = RAX ... 15 = R15).
        gpr: u8,
    },
    /// MOV from CRn to a general register.
    MovFrom {
        /// CR number.
        cr: u8,
        /// General register.
        gpr: u8,
    },
    /// CLTS.
    Clts,
    /// LMSW with its 16-bit source value.
    Lmsw {
        /// Source operand.
        value: u16,
    },
}

impl CrAccess {
    /// Decodes the exit qualification.
    pub const fn decode(q: u64) -> Self {
        let cr = (q & 0xf) as u8;
        let gpr = ((q >> 8) & 0xf) as u8;
        match (q >> 4) & 3 {
            0 => Self::MovTo { cr, gpr },
            1 => Self::MovFrom { cr, gpr },
            2 => Self::Clts,
            _ => Self::Lmsw {
                value: (q >> 16) as u16,
            },
        }
    }
}

/// Exit qualification of an I/O instruction (SDM Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    /// Bytes: 1, 2 or 4.
    pub size: u8,
    /// IN (else OUT).
    pub input: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
    /// Port.
    pub port: u16,
}

impl IoAccess {
    /// Decodes the exit qualification. The size encodings are 0, 1 and 3; the unused
    /// ones decode as 4 bytes, so that `size` is always 1, 2 or 4 (callers shift by
    /// `8 * size`).
    pub const fn decode(q: u64) -> Self {
        Self {
            size: match q & 7 {
                0 => 1,
                1 => 2,
                _ => 4,
            },
            input: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            port: (q >> 16) as u16,
        }
    }
}

/// The memory operand and register of INVEPT, INVPCID, INVVPID and similar exits
/// (VM-exit instruction-information field, SDM Vol. 3C Table 28-9; the displacement is
/// the exit qualification).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOperand {
    /// Scale: 1, 2, 4 or 8.
    pub scale: u8,
    /// Address size in bits: 16, 32 or 64.
    pub addr_bits: u8,
    /// Segment register (ES CS SS DS FS GS = 0..5).
    pub seg: u8,
    /// Index register, if any.
    pub index: Option<u8>,
    /// Base register, if any.
    pub base: Option<u8>,
    /// The register operand (Reg2).
    pub reg2: u8,
}

impl MemOperand {
    /// Decodes the instruction-information field.
    pub const fn decode(info: u32) -> Self {
        Self {
            scale: 1 << (info & 3),
            addr_bits: match (info >> 7) & 7 {
                0 => 16,
                1 => 32,
                _ => 64,
            },
            seg: ((info >> 15) & 7) as u8,
            index: if info & (1 << 22) == 0 {
                Some(((info >> 18) & 0xf) as u8)
            } else {
                None
            },
            base: if info & (1 << 27) == 0 {
                Some(((info >> 23) & 0xf) as u8)
            } else {
                None
            },
            reg2: ((info >> 28) & 0xf) as u8,
        }
    }

    /// The effective address, from the register values `reg(n)` and the displacement.
    pub fn effective(&self, disp: u64, reg: impl Fn(u8) -> u64) -> u64 {
        let mut a = disp;
        if let Some(b) = self.base {
            a = a.wrapping_add(reg(b));
        }
        if let Some(i) = self.index {
            a = a.wrapping_add(reg(i).wrapping_mul(u64::from(self.scale)));
        }
        match self.addr_bits {
            16 => a & 0xffff,
            32 => a & 0xffff_ffff,
            _ => a,
        }
    }
}

/// VM-exit/entry interruption information (SDM Table 25-17/24-16).
pub mod intr {
    /// Valid bit.
    pub const VALID: u32 = 1 << 31;
    /// An error code is delivered.
    pub const HAS_ERROR_CODE: u32 = 1 << 11;
    /// Type: external interrupt.
    pub const TYPE_EXT_INTR: u32 = 0 << 8;
    /// Type: NMI.
    pub const TYPE_NMI: u32 = 2 << 8;
    /// Type: hardware exception.
    pub const TYPE_HW_EXCEPTION: u32 = 3 << 8;
    /// Type: software interrupt (INT n).
    pub const TYPE_SW_INTR: u32 = 4 << 8;
    /// Type: privileged software exception (INT1).
    pub const TYPE_PRIV_SW_EXCEPTION: u32 = 5 << 8;
    /// Type: software exception (INT3, INTO).
    pub const TYPE_SW_EXCEPTION: u32 = 6 << 8;
    /// Type mask.
    pub const TYPE_MASK: u32 = 7 << 8;
    /// NMI unblocking due to IRET (exit information only).
    pub const NMI_UNBLOCK: u32 = 1 << 12;

    /// Vector of an interruption-information word.
    pub const fn vector(info: u32) -> u8 {
        info as u8
    }
}

/// Exception vectors rvmm deals with.
pub mod vector {
    /// #DE.
    pub const DE: u8 = 0;
    /// #DB.
    pub const DB: u8 = 1;
    /// #UD.
    pub const UD: u8 = 6;
    /// #DF.
    pub const DF: u8 = 8;
    /// #TS.
    pub const TS: u8 = 10;
    /// #NP.
    pub const NP: u8 = 11;
    /// #SS.
    pub const SS: u8 = 12;
    /// #GP.
    pub const GP: u8 = 13;
    /// #PF.
    pub const PF: u8 = 14;
    /// #AC.
    pub const AC: u8 = 17;
    /// #MC.
    pub const MC: u8 = 18;

    /// Faults (SDM Table 6-1): the saved RIP points at the faulting instruction.
    pub const fn is_fault(v: u8) -> bool {
        // #DE #BR #UD #NM #TS #NP #SS #GP #PF #MF #AC #XM #VE #CP; #DB, #BP and #OF are
        // traps (an instruction-breakpoint #DB is a fault; the #DB rvmm injects is a trap),
        // #DF and #MC aborts.
        matches!(v, 0 | 5 | 6 | 7 | 10..=14 | 16 | 17 | 19 | 20 | 21)
    }

    /// Exceptions that push an error code (SDM 6.15).
    pub const fn has_error_code(v: u8) -> bool {
        matches!(v, DF | TS | NP | SS | GP | PF | AC)
    }

    /// Contributory exceptions (SDM Table 6-4).
    pub const fn contributory(v: u8) -> bool {
        matches!(v, DE | TS | NP | SS | GP)
    }
}

/// What delivering `new` while `pending` was being delivered turns into (SDM Table
/// 6-5): `Some(vector)` to deliver, or `None` for a triple fault.
pub const fn combine_exceptions(pending: u8, new: u8) -> Option<u8> {
    if pending == vector::DF {
        return None;
    }
    let new_pf_or_contrib = new == vector::PF || vector::contributory(new);
    if (vector::contributory(pending) && vector::contributory(new))
        || (pending == vector::PF && new_pf_or_contrib)
    {
        Some(vector::DF)
    } else {
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reasons() {
        assert_eq!(ExitReason::from_basic(10), Some(ExitReason::Cpuid));
        assert_eq!(ExitReason::from_basic(30), Some(ExitReason::Io));
        assert_eq!(ExitReason::from_basic(65535), None);
        assert!((ExitReason::Xrstors as usize) < NR_EXIT_REASONS);
        assert_eq!(ExitReason::from_basic(44), Some(ExitReason::ApicAccess));
        assert_eq!(ExitReason::from_basic(56), Some(ExitReason::ApicWrite));
    }

    #[test]
    fn decode_apic_exits() {
        // A read of the timer's current count (0x390), a write at 0x3f0, a fetch.
        assert_eq!(ApicAccessQual::decode(0x390), ApicAccessQual::Read(0x390));
        assert_eq!(ApicAccessQual::decode(0x13f0), ApicAccessQual::Write(0x3f0));
        assert_eq!(ApicAccessQual::decode(0x2000), ApicAccessQual::Fetch);
        assert_eq!(
            ApicAccessQual::decode(0x3020),
            ApicAccessQual::EventDelivery
        );
        assert_eq!(ApicAccessQual::decode(0xa000), ApicAccessQual::Other);
        assert_eq!(apic_write_offset(0x0b0), 0xb0);
        assert_eq!(apic_write_offset(0xffff_f302), 0x300);
    }

    #[test]
    fn decode_cr_and_io() {
        // mov %rbx, %cr3 -> cr 3, gpr 3 (RBX), access type 0.
        assert_eq!(CrAccess::decode(0x303), CrAccess::MovTo { cr: 3, gpr: 3 });
        assert_eq!(
            CrAccess::decode(0x0f14),
            CrAccess::MovFrom { cr: 4, gpr: 15 }
        );
        assert_eq!(CrAccess::decode(0x20), CrAccess::Clts);
        assert_eq!(CrAccess::decode(0x0001_0030), CrAccess::Lmsw { value: 1 });
        // out %al, $0xf4: size 1, OUT, port 0xf4.
        assert_eq!(
            IoAccess::decode(0x00f4_0000),
            IoAccess {
                size: 1,
                input: false,
                string: false,
                rep: false,
                port: 0xf4
            }
        );
        assert_eq!(
            IoAccess::decode(0x03f8_0039),
            IoAccess {
                size: 2,
                input: true,
                string: true,
                rep: true,
                port: 0x3f8
            }
        );
    }

    #[test]
    fn io_sizes_are_always_1_2_or_4() {
        for q in 0..8u64 {
            let io = IoAccess::decode(q | (0xffff_ffff_fff8 << 3));
            assert!(matches!(io.size, 1 | 2 | 4), "{q}");
            // What callers do with it.
            let _ = (1u64 << (8 * u32::from(io.size))) - 1;
        }
        assert_eq!(IoAccess::decode(3).size, 4);
        // Any 64-bit memory operand: no overflow in the address computation.
        for info in [0, u32::MAX, 0x7fff_ffff, 3 | (1 << 7)] {
            let m = MemOperand::decode(info);
            assert_eq!(
                m.effective(u64::MAX, |_| u64::MAX) >> 32 == 0,
                m.addr_bits < 64
            );
        }
    }

    #[test]
    fn double_and_triple_faults() {
        use vector::*;
        assert_eq!(combine_exceptions(PF, PF), Some(DF));
        assert_eq!(combine_exceptions(GP, PF), Some(PF));
        assert_eq!(combine_exceptions(GP, GP), Some(DF));
        assert_eq!(combine_exceptions(PF, GP), Some(DF));
        assert_eq!(combine_exceptions(UD, PF), Some(PF));
        assert_eq!(combine_exceptions(DF, PF), None);
        assert!(has_error_code(PF) && !has_error_code(UD));
    }

    #[test]
    fn mem_operand_of_invpcid() {
        // invpcid rax, [rdi + rcx*8 + 0x10]: scale 8 (3), 64-bit address (2 << 7),
        // DS (3 << 15), index rcx (1 << 18), base rdi (7 << 23), reg2 rax (0 << 28).
        let info = 3 | (2 << 7) | (3 << 15) | (1 << 18) | (7 << 23);
        let m = MemOperand::decode(info);
        assert_eq!(
            m,
            MemOperand {
                scale: 8,
                addr_bits: 64,
                seg: 3,
                index: Some(1),
                base: Some(7),
                reg2: 0
            }
        );
        assert_eq!(
            m.effective(0x10, |r| [0, 2, 0, 0, 0, 0, 0, 0x1000][r as usize]),
            0x1020
        );
        // No base, no index (bits 27 and 22), 32-bit addressing wraps.
        let m = MemOperand::decode((1 << 7) | (1 << 22) | (1 << 27) | (9 << 28));
        assert_eq!((m.base, m.index, m.reg2), (None, None, 9));
        assert_eq!(m.effective(0x1_0000_0004, |_| 0), 4);
    }
}
