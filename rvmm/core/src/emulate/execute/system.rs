// SPDX-License-Identifier: GPL-2.0

//! System instructions: MOV to and from control registers, LMSW/SMSW/CLTS, the
//! descriptor-table loads and stores, RDMSR/WRMSR, CPUID, HLT, INVD/WBINVD, and IN/OUT.
//! Each takes the privilege checks of the SDM; the changes go to the [`Env`] as
//! [`SysWrite`]s, which it checks and applies at commit.

use super::super::decode::{Map, Rm};
use super::super::flags::mask;
use super::{Cpu, Done, Env, Exception, Stop, SysWrite, RAX, RCX, RDX};

const CR0_TS: u64 = 1 << 3;

impl<E: Env> Cpu<'_, E> {
    /// #GP(0) unless the instruction runs at privilege level 0 (in virtual-8086 mode
    /// the level is 3).
    fn privileged(&self) -> Result<(), Stop> {
        if self.mode.cpl == 0 {
            Ok(())
        } else {
            Err(Exception::GP0.into())
        }
    }

    fn port_allowed(&self) -> bool {
        // Real mode, or protected mode at CPL <= IOPL. Otherwise the CPU consults the
        // TSS's I/O permission bitmap, which the emulator does not read.
        self.mode.cpl == 0
            || (self.mode.protected && self.mode.cpl <= (self.r.rflags >> 12 & 3) as u8)
    }

    /// The instructions of this file; `Unsupported` for any other.
    pub(super) fn run_system(&mut self, next: u64) -> Result<Done, Stop> {
        let i = *self.insn;
        let w = i.opsize;
        let ext = i.reg & 7;
        match (i.map, i.op) {
            (Map::Two, 0x20 | 0x22) => {
                self.privileged()?;
                let n = i.reg;
                if !matches!(n, 0 | 2 | 3 | 4) || i.lock {
                    return Err(Exception::UD.into());
                }
                let Some(Rm::Reg(r)) = i.rm else {
                    return Err(Exception::UD.into());
                };
                let size = if i.long { 8 } else { 4 };
                if i.op == 0x20 {
                    let v = self.env.control()?.cr[usize::from(n)];
                    self.set_reg(r, size, v);
                } else {
                    let v = self.reg(r, size);
                    self.env.sys_write(SysWrite::Cr(n, v))?;
                }
            }
            (Map::Two, 0x01) => match ext {
                0 | 1 => {
                    // SGDT, SIDT: limit, then a 32-bit base (64 in 64-bit mode).
                    let m = self.mem_only()?;
                    let ea = self.ea(&m);
                    let c = self.env.control()?;
                    let (base, limit) = if ext == 0 { c.gdtr } else { c.idtr };
                    let bsize = if i.long { 8 } else { 4 };
                    self.write_at(m.seg, ea, 2, limit.into())?;
                    let ea2 = ea.wrapping_add(2) & mask(i.addrsize);
                    self.write_at(m.seg, ea2, bsize, base & mask(bsize))?;
                }
                2 | 3 => {
                    let m = self.mem_only()?;
                    self.privileged()?;
                    let ea = self.ea(&m);
                    let limit = self.read_at(m.seg, ea, 2)? as u16;
                    let bsize = if i.long { 8 } else { 4 };
                    let ea2 = ea.wrapping_add(2) & mask(i.addrsize);
                    let mut base = self.read_at(m.seg, ea2, bsize)?;
                    if w == 2 && !i.long {
                        base &= 0xff_ffff;
                    }
                    let wr = if ext == 2 {
                        SysWrite::Gdtr(base, limit)
                    } else {
                        SysWrite::Idtr(base, limit)
                    };
                    self.env.sys_write(wr)?;
                }
                4 => {
                    let cr0 = self.env.control()?.cr[0];
                    if self.rm_is_reg() {
                        self.write_rm(w, cr0)?;
                    } else {
                        self.write_rm(2, cr0)?;
                    }
                }
                6 => {
                    self.privileged()?;
                    let v = self.read_rm(2)?;
                    let cr0 = self.env.control()?.cr[0];
                    // LMSW sets PE but cannot clear it.
                    let new = (cr0 & !0xf) | (v & 0xf) | (cr0 & 1);
                    self.env.sys_write(SysWrite::Cr(0, new))?;
                }
                _ => return Err(Stop::Unsupported(0x0f01)),
            },
            (Map::Two, 0x06) => {
                self.privileged()?;
                let cr0 = self.env.control()?.cr[0];
                self.env.sys_write(SysWrite::Cr(0, cr0 & !CR0_TS))?;
            }
            (Map::Two, 0x08 | 0x09) => self.privileged()?,
            (Map::Two, 0x30) => {
                self.privileged()?;
                let index = self.r.gpr[usize::from(RCX)] as u32;
                let v = (self.r.gpr[usize::from(RDX)] << 32)
                    | (self.r.gpr[usize::from(RAX)] & 0xffff_ffff);
                self.env.sys_write(SysWrite::Msr(index, v))?;
            }
            (Map::Two, 0x32) => {
                self.privileged()?;
                let v = self.env.rdmsr(self.r.gpr[usize::from(RCX)] as u32)?;
                self.set_reg(RAX, 4, v & 0xffff_ffff);
                self.set_reg(RDX, 4, v >> 32);
            }
            (Map::Two, 0xa2) => {
                let leaf = self.r.gpr[usize::from(RAX)] as u32;
                let sub = self.r.gpr[usize::from(RCX)] as u32;
                let [a, b, c, d] = self.env.cpuid(leaf, sub)?;
                self.set_reg(RAX, 4, a.into());
                self.set_reg(3, 4, b.into());
                self.set_reg(RCX, 4, c.into());
                self.set_reg(RDX, 4, d.into());
            }
            (Map::One, 0xf4) => {
                self.privileged()?;
                self.env.sys_write(SysWrite::Halt)?;
            }
            (Map::One, 0xe4..=0xe7 | 0xec..=0xef) => {
                if !self.port_allowed() {
                    return Err(Stop::Unsupported(u32::from(i.op)));
                }
                let size = if i.op & 1 == 0 { 1 } else { w.min(4) };
                let port = if i.op < 0xe8 {
                    (i.imm & 0xff) as u16
                } else {
                    self.r.gpr[usize::from(RDX)] as u16
                };
                if i.op & 2 == 0 {
                    let v = self.env.port_in(port, size)?;
                    self.set_reg(RAX, size, v);
                } else {
                    let v = self.reg(RAX, size);
                    self.env.port_out(port, size, v)?;
                }
            }
            _ => {
                return Err(Stop::Unsupported(match i.map {
                    Map::One => u32::from(i.op),
                    Map::Two => 0x0f00 | u32::from(i.op),
                    Map::Three38 => 0x0f_3800 | u32::from(i.op),
                }))
            }
        }
        self.r.rip = next;
        Ok(Done::Next)
    }
}
