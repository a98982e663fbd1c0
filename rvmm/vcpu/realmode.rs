// SPDX-License-Identifier: GPL-2.0

//! Real mode without "unrestricted guest" (no EPT): an AP that a start-up IPI starts
//! runs its real-mode code in virtual-8086 mode, with IOPL 0 and every exception
//! intercepted, so that what vm86 cannot run the way real mode does exits as #GP and is
//! carried out here (`rvmm_core::realmode` decodes it): CLI/STI, PUSHF/POPF, INT/IRET
//! through the real-mode IVT, HLT, IN/OUT, LGDT/LIDT, CR moves, LMSW/SMSW, RDMSR/WRMSR.
//! When the guest sets CR0.PE, the instructions up to its far JMP (which loads CS from
//! its GDT) are carried out here too: then the guest is in protected mode proper.
//!
//! The vm86 task needs a TSS for VMX's checks only (every exception exits, so the CPU
//! never reads it): TR is a 104-byte busy TSS at 0. Interrupts are not injected while a
//! vCPU is in real mode (its trampoline runs with them off).

use core::ptr;

use rvmm_core::exit::IoAccess;
use rvmm_core::mmu::mode::*;
use rvmm_core::realmode::{self, Insn, Rm, Seg};
use rvmm_uapi as uapi;
use x86::vmx::vmcs::{control, guest};

use super::state::SEGS;
use super::{Next, Pending, VcpuInner};
use crate::vmx::CurrentVmcs;

/// VMX access rights of every segment in vm86 mode (SDM 27.3.1.2).
const AR_VM86: u64 = 0xf3;
pub(super) const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IOPL: u64 = 3 << 12;

/// The VMCS fields of `Seg` (SEGS is in uapi order: CS DS ES FS GS SS TR LDTR).
fn fields(s: Seg) -> (u32, u32, u32, u32) {
    SEGS[match s {
        Seg::Cs => 0,
        Seg::Ds => 1,
        Seg::Es => 2,
        Seg::Fs => 3,
        Seg::Gs => 4,
        Seg::Ss => 5,
    }]
}

const ALL_SEGS: [Seg; 6] = [Seg::Es, Seg::Cs, Seg::Ss, Seg::Ds, Seg::Fs, Seg::Gs];

impl VcpuInner {
    fn seg_base(&self, vmcs: &CurrentVmcs, s: Seg) -> u64 {
        vmcs.read(fields(s).1)
    }

    /// The linear address (physical: there is no paging here) of `s:off`. The base is
    /// whatever the guest or userspace (SET_SREGS) left there, so the sum wraps at 32
    /// bits, as linear addresses do outside IA-32e mode (for real-mode bases, at most
    /// 0xffff0, it is the plain sum).
    fn linear(&self, vmcs: &CurrentVmcs, s: Seg, off: u64) -> u64 {
        self.seg_base(vmcs, s).wrapping_add(off) & 0xffff_ffff
    }

    /// Loads a real-mode segment register (base = selector << 4).
    fn set_rm_seg(&self, vmcs: &CurrentVmcs, s: Seg, sel: u16) {
        let (fs, fb, fl, fa) = fields(s);
        vmcs.write(fs, sel.into());
        vmcs.write(fb, u64::from(sel) << 4);
        vmcs.write(fl, 0xffff);
        vmcs.write(fa, AR_VM86);
    }

    /// A start-up IPI with `vector`: the vCPU starts in real mode at vector << 12.
    pub(super) fn start_real_mode(&mut self, vmcs: &CurrentVmcs, vector: u8) {
        self.cr0 = (1 << 4) | (1 << 29) | (1 << 30); // ET, NW, CD
        self.cr4 = 0;
        self.efer = 0;
        self.cr3 = 0;
        self.apply_paging_state(vmcs);
        for s in ALL_SEGS {
            self.set_rm_seg(vmcs, s, 0);
        }
        self.set_rm_seg(vmcs, Seg::Cs, u16::from(vector) << 8);
        vmcs.write(guest::TR_SELECTOR, 0);
        vmcs.write(guest::TR_BASE, 0);
        vmcs.write(guest::TR_LIMIT, 0x67);
        vmcs.write(guest::TR_ACCESS_RIGHTS, 0x8b);
        vmcs.write(guest::LDTR_ACCESS_RIGHTS, 0x1_0000);
        vmcs.write(guest::GDTR_BASE, 0);
        vmcs.write(guest::GDTR_LIMIT, 0xffff);
        vmcs.write(guest::IDTR_BASE, 0);
        vmcs.write(guest::IDTR_LIMIT, 0xffff);
        vmcs.write(guest::RIP, 0);
        vmcs.write(guest::RSP, 0);
        vmcs.write(guest::RFLAGS, 2 | RFLAGS_VM);
        vmcs.write(guest::INTERRUPTIBILITY_STATE, 0);
        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        vmcs.write(control::EXCEPTION_BITMAP, 0xffff_ffff);
        self.gprs = Default::default();
        // INIT's debug registers (SDM Vol. 3A, Table 10-1).
        self.dr = [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400];
        vmcs.write(guest::DR7, 0x400);
        self.rmode = true;
        // rvmm made this state; the pre-entry checks are for protected and long mode.
        self.state_checked = true;
        self.need_reset = true;
    }

    fn phys_read(&self, pa: u64, out: &mut [u8]) -> bool {
        match self.slots.ptr(pa, out.len() as u64) {
            Some(p) => {
                // SAFETY: `out.len()` bytes of pinned guest memory.
                unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
                true
            }
            None => false,
        }
    }

    /// Writes guest RAM; false outside RAM or into a read-only slot (never written).
    fn phys_write(&self, pa: u64, data: &[u8]) -> bool {
        match self.slots.ptr_mut(pa, data.len() as u64) {
            Some(p) => {
                // SAFETY: `data.len()` bytes of pinned, writable guest memory.
                unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                true
            }
            None => false,
        }
    }

    fn push16(&mut self, vmcs: &CurrentVmcs, v: u16) -> bool {
        let sp = (vmcs.read(guest::RSP) as u16).wrapping_sub(2);
        vmcs.write(
            guest::RSP,
            (vmcs.read(guest::RSP) & !0xffff) | u64::from(sp),
        );
        self.phys_write(self.linear(vmcs, Seg::Ss, sp.into()), &v.to_le_bytes())
    }

    fn pop(&mut self, vmcs: &CurrentVmcs, size: u16) -> Option<u32> {
        let sp = vmcs.read(guest::RSP) as u16;
        let mut b = [0u8; 4];
        if !self.phys_read(
            self.linear(vmcs, Seg::Ss, sp.into()),
            &mut b[..usize::from(size)],
        ) {
            return None;
        }
        vmcs.write(
            guest::RSP,
            (vmcs.read(guest::RSP) & !0xffff) | u64::from(sp.wrapping_add(size)),
        );
        Some(u32::from_le_bytes(b))
    }

    /// Real-mode interrupt delivery: FLAGS, CS and IP (of `ret_ip`) on the stack, IF
    /// and TF clear, CS:IP from the IVT.
    fn rm_interrupt(&mut self, vmcs: &CurrentVmcs, vector: u8, ret_ip: u16) -> bool {
        let mut ivt = [0u8; 4];
        if !self.phys_read(u64::from(vector) * 4, &mut ivt) {
            return false;
        }
        let flags = vmcs.read(guest::RFLAGS);
        let cs = vmcs.read(guest::CS_SELECTOR) as u16;
        let ok =
            self.push16(vmcs, flags as u16) && self.push16(vmcs, cs) && self.push16(vmcs, ret_ip);
        vmcs.write(guest::RFLAGS, flags & !(RFLAGS_IF | RFLAGS_TF));
        self.set_rm_seg(vmcs, Seg::Cs, u16::from_le_bytes([ivt[2], ivt[3]]));
        vmcs.write(guest::RIP, u16::from_le_bytes([ivt[0], ivt[1]]).into());
        ok
    }

    fn fetch16(&self, vmcs: &CurrentVmcs) -> ([u8; 15], usize) {
        let mut code = [0u8; 15];
        let ip = vmcs.read(guest::RIP) & 0xffff;
        let mut n = 0;
        while n < code.len()
            && self.phys_read(
                self.linear(vmcs, Seg::Cs, ip + n as u64),
                &mut code[n..n + 1],
            )
        {
            n += 1;
        }
        (code, n)
    }

    /// An exception in vm86 mode: #GP is an instruction real mode runs and vm86 does
    /// not, which is carried out here; other exceptions go to the guest's IVT.
    pub(super) fn rmode_exception(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        vec: u8,
    ) -> Next {
        let ip = vmcs.read(guest::RIP) as u16;
        if vec != rvmm_core::exit::vector::GP {
            if !self.rm_interrupt(vmcs, vec, ip) {
                return self.rmode_failed(vmcs, run, 0);
            }
            return Next::Fast;
        }
        let (code, n) = self.fetch16(vmcs);
        let Ok(d) = realmode::decode(&code[..n]) else {
            return self.rmode_failed(
                vmcs,
                run,
                u64::from_le_bytes(code[..8].try_into().unwrap_or([0; 8])),
            );
        };
        let next_ip = u64::from(ip.wrapping_add(d.len.into()));
        let flags = vmcs.read(guest::RFLAGS);
        match d.insn {
            Insn::Cli => vmcs.write(guest::RFLAGS, flags & !RFLAGS_IF),
            Insn::Sti => vmcs.write(guest::RFLAGS, flags | RFLAGS_IF),
            Insn::Pushf { o32 } => {
                let v = flags & !(RFLAGS_VM | (1 << 16) | RFLAGS_IOPL);
                let ok = if o32 {
                    self.push16(vmcs, (v >> 16) as u16) && self.push16(vmcs, v as u16)
                } else {
                    self.push16(vmcs, v as u16)
                };
                if !ok {
                    return self.rmode_failed(vmcs, run, 1);
                }
            }
            Insn::Popf { o32 } => {
                let Some(v) = self.pop(vmcs, if o32 { 4 } else { 2 }) else {
                    return self.rmode_failed(vmcs, run, 1);
                };
                let keep = if o32 { 0 } else { flags & !0xffff };
                let v = keep | u64::from(v) & 0x3f_7fd5 & !(RFLAGS_VM | RFLAGS_IOPL);
                vmcs.write(guest::RFLAGS, v | 2 | RFLAGS_VM);
            }
            Insn::Int(n) => {
                if !self.rm_interrupt(vmcs, n, next_ip as u16) {
                    return self.rmode_failed(vmcs, run, 2);
                }
                return Next::Fast;
            }
            Insn::Iret { o32 } => {
                let size = if o32 { 4 } else { 2 };
                let (Some(new_ip), Some(cs), Some(fl)) = (
                    self.pop(vmcs, size),
                    self.pop(vmcs, size),
                    self.pop(vmcs, size),
                ) else {
                    return self.rmode_failed(vmcs, run, 3);
                };
                self.set_rm_seg(vmcs, Seg::Cs, cs as u16);
                vmcs.write(guest::RIP, u64::from(new_ip & 0xffff));
                let v = u64::from(fl) & 0x3f_7fd5 & !(RFLAGS_VM | RFLAGS_IOPL);
                vmcs.write(guest::RFLAGS, (flags & !0xffff) | v | 2 | RFLAGS_VM);
                return Next::Fast;
            }
            Insn::Hlt => {
                vmcs.write(guest::RIP, next_ip);
                // No interrupts reach a vCPU in real mode: the HLT ends its run.
                // SAFETY: our run page.
                unsafe {
                    ptr::write_volatile(ptr::addr_of_mut!((*run).exit_reason), uapi::RVMM_EXIT_HLT)
                };
                return Next::User;
            }
            Insn::In { size, port } | Insn::Out { size, port } => {
                let input = matches!(d.insn, Insn::In { .. });
                let port = port.map_or(self.gprs.rdx as u16, u16::from);
                let data = if input {
                    0
                } else {
                    self.gprs.rax & ((1u64 << (8 * u32::from(size))) - 1)
                };
                self.pending = if input {
                    Pending::IoIn {
                        size,
                        rip: u64::from(ip),
                        len: d.len,
                    }
                } else {
                    Pending::IoOut {
                        rip: u64::from(ip),
                        len: d.len,
                    }
                };
                let io = IoAccess {
                    size,
                    input,
                    string: false,
                    rep: false,
                    port,
                };
                return self.io_exit(run, io, data);
            }
            Insn::Lgdt { mem, o32 } | Insn::Lidt { mem, o32 } => {
                let ea = realmode::effective(&mem, |r| self.gprs.get(r, vmcs.read(guest::RSP)));
                let mut b = [0u8; 6];
                if !self.phys_read(self.linear(vmcs, mem.seg, ea.into()), &mut b) {
                    return self.rmode_failed(vmcs, run, 4);
                }
                let limit = u16::from_le_bytes([b[0], b[1]]);
                let mut base = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                if !o32 {
                    base &= 0x00ff_ffff;
                }
                let (fb, fl) = if matches!(d.insn, Insn::Lgdt { .. }) {
                    (guest::GDTR_BASE, guest::GDTR_LIMIT)
                } else {
                    (guest::IDTR_BASE, guest::IDTR_LIMIT)
                };
                vmcs.write(fb, base.into());
                vmcs.write(fl, limit.into());
            }
            Insn::MovFromCr { cr, gpr } => {
                let v = match cr {
                    0 => self.cr0,
                    2 => self.cr2,
                    3 => self.cr3,
                    4 => self.cr4,
                    _ => return self.rmode_failed(vmcs, run, 5),
                };
                self.gprs.set(gpr, v & 0xffff_ffff);
            }
            Insn::Smsw(r) => {
                let v = (self.gprs.get(r, 0) & !0xffff) | (self.cr0 & 0xffff);
                self.gprs.set(r, v);
            }
            Insn::MovToCr { cr, gpr } => {
                let v = self.gprs.get(gpr, vmcs.read(guest::RSP)) & 0xffff_ffff;
                match cr {
                    0 => return self.rmode_set_cr0(vmcs, run, v, next_ip),
                    3 => self.cr3 = v,
                    4 if v & !0x0007_06f8 == 0 => {
                        self.cr4 = v;
                        self.apply_paging_state(vmcs);
                    }
                    _ => return self.rmode_failed(vmcs, run, 6),
                }
            }
            Insn::Lmsw(rm) => {
                let v = match rm {
                    Rm::Reg(r) => self.gprs.get(r, vmcs.read(guest::RSP)) as u16,
                    Rm::Mem(m) => {
                        let ea =
                            realmode::effective(&m, |r| self.gprs.get(r, vmcs.read(guest::RSP)));
                        let mut b = [0u8; 2];
                        if !self.phys_read(self.linear(vmcs, m.seg, ea.into()), &mut b) {
                            return self.rmode_failed(vmcs, run, 7);
                        }
                        u16::from_le_bytes(b)
                    }
                };
                // LMSW sets PE but cannot clear it.
                let cr0 = (self.cr0 & !0xe) | u64::from(v & 0xf);
                return self.rmode_set_cr0(vmcs, run, cr0, next_ip);
            }
            Insn::Rdmsr | Insn::Wrmsr => {
                let index = self.gprs.rcx as u32;
                let ok = if matches!(d.insn, Insn::Rdmsr) {
                    match self.get_msr(vmcs, index) {
                        Some(v) => {
                            self.gprs.rax = v & 0xffff_ffff;
                            self.gprs.rdx = v >> 32;
                            true
                        }
                        None => false,
                    }
                } else {
                    let v = (self.gprs.rdx << 32) | (self.gprs.rax & 0xffff_ffff);
                    self.set_msr(vmcs, index, v)
                };
                if !ok {
                    return self.rmode_failed(vmcs, run, 8);
                }
            }
            Insn::JmpFar { .. } | Insn::JmpNear { .. } => return self.rmode_failed(vmcs, run, 9),
        }
        vmcs.write(guest::RIP, next_ip);
        Next::Fast
    }

    /// CR0 written in real mode. Setting PE: the guest's next instructions, up to the
    /// far JMP that loads CS from its GDT, run here; then it is in protected mode.
    fn rmode_set_cr0(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        v: u64,
        next_ip: u64,
    ) -> Next {
        if v & CR0_PG != 0 {
            // Paging straight from real mode: not supported (trampolines go through
            // protected mode first).
            return self.rmode_failed(vmcs, run, 10);
        }
        self.cr0 = v;
        vmcs.write(guest::RIP, next_ip);
        if v & CR0_PE == 0 {
            self.apply_paging_state(vmcs);
            return Next::Fast;
        }
        for _ in 0..8 {
            let (code, n) = self.fetch16(vmcs);
            let ip = vmcs.read(guest::RIP) as u16;
            match realmode::decode(&code[..n]) {
                Ok(d) => match d.insn {
                    Insn::JmpNear { rel } => {
                        let t = i32::from(ip.wrapping_add(d.len.into())).wrapping_add(rel);
                        vmcs.write(guest::RIP, u64::from(t as u16));
                    }
                    Insn::JmpFar { sel, off } => return self.enter_protected(vmcs, run, sel, off),
                    _ => break,
                },
                Err(_) => break,
            }
        }
        self.rmode_failed(vmcs, run, 11)
    }

    /// The far JMP after CR0.PE: CS from the guest's GDT, the other segments keep their
    /// real-mode bases and limits as ring-0 data segments; vm86 and its intercepts end.
    fn enter_protected(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        sel: u16,
        off: u32,
    ) -> Next {
        let gdt = vmcs.read(guest::GDTR_BASE);
        let mut d = [0u8; 8];
        if sel & 4 != 0
            || u64::from(sel | 7) > vmcs.read(guest::GDTR_LIMIT)
            || !self.phys_read(gdt.wrapping_add(u64::from(sel & !7)) & 0xffff_ffff, &mut d)
        {
            return self.rmode_failed(vmcs, run, 12);
        }
        let base = u64::from(u16::from_le_bytes([d[2], d[3]]))
            | u64::from(d[4]) << 16
            | u64::from(d[7]) << 24;
        let mut limit = u32::from(u16::from_le_bytes([d[0], d[1]])) | u32::from(d[6] & 0xf) << 16;
        if d[6] & 0x80 != 0 {
            limit = (limit << 12) | 0xfff;
        }
        let ar = u64::from(d[5]) | u64::from(d[6] & 0xf0) << 8;
        // A present code segment.
        if ar & 0x80 == 0 || ar & 0x18 != 0x18 {
            return self.rmode_failed(vmcs, run, 13);
        }
        for s in ALL_SEGS {
            let (_, _, _, fa) = fields(s);
            vmcs.write(fa, 0x93);
        }
        let (fs, fb, fl, fa) = fields(Seg::Cs);
        vmcs.write(fs, sel.into());
        vmcs.write(fb, base);
        vmcs.write(fl, limit.into());
        vmcs.write(fa, ar | 1);
        vmcs.write(guest::RIP, off.into());
        vmcs.write(guest::RFLAGS, vmcs.read(guest::RFLAGS) & !RFLAGS_VM);
        vmcs.write(control::EXCEPTION_BITMAP, super::EXCEPTION_BITMAP);
        self.rmode = false;
        self.state_checked = false;
        self.apply_paging_state(vmcs);
        Next::Fast
    }

    fn rmode_failed(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, what: u64) -> Next {
        user_pr!(
            pr_info,
            "vcpu {}: real-mode code at {:#x}:{:#x} that rvmm cannot run ({})\n",
            self.vcpu_id,
            vmcs.read(guest::CS_SELECTOR),
            vmcs.read(guest::RIP),
            what
        );
        self.internal_error(
            run,
            uapi::RVMM_INTERNAL_EMULATION,
            [
                vmcs.read(guest::CS_BASE)
                    .wrapping_add(vmcs.read(guest::RIP)),
                what,
                0,
                5,
            ],
        )
    }
}
