// SPDX-License-Identifier: GPL-2.0

//! The guest as the instruction emulator sees it ([`GuestEnv`]): linear memory through
//! the guest's page tables, RAM through the memory map, device memory through
//! userspace (MMIO exits) or the in-kernel xAPIC; and how an emulated instruction's
//! results are committed. The MMIO path (`mmio`) and the page-table write path
//! (`pt_write`, in `paging.rs`) both run instructions through here.

use rvmm_core::debug::{data_breakpoints_hit, DataAccess, ENABLED_BREAKPOINT};
use rvmm_core::emulate::{Control, Done, Env, Exception, Insn, Mode, Regs, SegReg, Stop, SysWrite};
use rvmm_core::guest_state::Seg;

use super::*;
use crate::vcpu::realmode::seg_index;

/// Port reads share the answer cache with MMIO reads, keyed apart by this bit (no
/// guest-physical address has it).
pub(crate) const PORT_KEY: u64 = 1 << 63;

/// MMIO reads one instruction may make (a 32-byte load crossing a page makes five).
const MAX_MMIO_READS: usize = 5;

/// What made rvmm carry out the instruction at RIP, which decides what it may be: the
/// bytes are fetched again, and another vCPU (or a stale TLB entry) may have changed
/// them since the exit.
#[derive(Clone, Copy)]
pub(in crate::vcpu) enum Cause {
    /// An access to device memory: anything but INS/OUTS (those exit as I/O first,
    /// after the CPU's I/O permission checks).
    Mmio,
    /// A string I/O exit: only INS/OUTS of the port, size and direction that exited.
    StringIo { port: u16, size: u8, input: bool },
    /// A guest VMX cannot enter (real mode outside vm86, a mode switch), or an
    /// instruction vm86 refused: any instruction, with its architectural checks.
    Any,
}

/// Instructions an MMIO exit never leads to the emulator for: they access no memory
/// operand (or only system tables), and the CPU runs them with its own checks and
/// exits (I/O, HLT, CLI/STI, MOV CR, MSRs, CPUID, CLTS, INVD/WBINVD, LGDT/LIDT/LMSW).
fn system_insn(insn: &Insn) -> bool {
    use rvmm_core::emulate::Map;
    match insn.map {
        Map::One => matches!(insn.op, 0xe4..=0xe7 | 0xec..=0xef | 0xf4 | 0xfa | 0xfb),
        Map::Two => {
            matches!(
                insn.op,
                0x06 | 0x08 | 0x09 | 0x20 | 0x22 | 0x30 | 0x32 | 0xa2
            ) || (insn.op == 0x01 && matches!(insn.reg & 7, 2 | 3 | 6))
        }
        Map::Three38 => false,
    }
}

impl Cause {
    fn allows(&self, insn: &Insn, dx: u64) -> bool {
        let string_io =
            insn.map == rvmm_core::emulate::Map::One && (0x6c..=0x6f).contains(&insn.op);
        match *self {
            Cause::Any => true,
            Cause::Mmio => !string_io && !system_insn(insn),
            Cause::StringIo { port, size, input } => {
                let insn_size = if insn.op & 1 == 0 {
                    1
                } else {
                    insn.opsize.min(4)
                };
                string_io && dx as u16 == port && insn_size == size && (insn.op < 0x6e) == input
            }
        }
    }
}

/// Write pieces (at most 8 bytes each, within one page) one instruction may make (a
/// 32-byte store crossing a page: five).
const MAX_WRITES: usize = 6;
/// What a task switch may write: the old task's state (8 pieces), two busy bits, the
/// back link, the accessed bits of up to six descriptors, an error code (2). Its own
/// capacity keeps the common instruction path's environment small.
pub(in crate::vcpu) const TASK_SWITCH_WRITES: usize = 20;
/// Segment loads one instruction makes (far transfers, INT and IRET load CS; MOV Sreg
/// and LDS & co. one register); a task switch loads all six.
const MAX_SEG_LOADS: usize = 2;
pub(in crate::vcpu) const TASK_SWITCH_SEG_LOADS: usize = 6;
/// Data accesses one instruction makes (CMPXCHG: a read and a write; MOVS: two).
const MAX_ACCESSES: usize = 4;

/// The data of the MMIO reads userspace has answered for the instruction being
/// emulated (the instruction runs again from the start after each answer, and its
/// reads, in order, take these values until one misses); and the MMIO writes of a
/// completed instruction still to go to userspace, one exit each.
#[derive(Default)]
pub(crate) struct MmioReads {
    data: [(u64, u8, u64); MAX_MMIO_READS],
    n: usize,
    writes: [Option<Write>; MAX_WRITES],
    /// The instruction waiting for the answers: its RIP, bytes and the fault's
    /// translation, so that running it again needs neither the fetch nor that walk
    /// (the CPU had fetched it too when it faulted).
    waiting: Option<Waiting>,
}

#[derive(Clone, Copy)]
struct Waiting {
    rip: u64,
    /// The mode it was decoded in: a mode change since (SIPI, SET_SREGS) makes it
    /// another instruction.
    mode: Mode,
    code: [u8; 15],
    insn: Insn,
    hint: Option<Hint>,
    cause: Cause,
}

/// The translation a fault gave for the access that exited: guest-linear page to
/// guest-physical page, checked for the fault's access (a write, or a read).
#[derive(Clone, Copy)]
pub(in crate::vcpu) struct Hint {
    pub(in crate::vcpu) la_page: u64,
    pub(in crate::vcpu) gpa_page: u64,
    pub(in crate::vcpu) write: bool,
}

impl MmioReads {
    pub(crate) fn clear(&mut self) {
        self.n = 0;
        self.waiting = None;
    }

    /// What made the instruction waiting for an answer run in the emulator.
    pub(crate) fn resume_cause(&self, default: Cause) -> Cause {
        self.waiting.map_or(default, |w| w.cause)
    }

    fn next_write(&mut self) -> Option<Write> {
        let w = self.writes.iter_mut().find(|w| w.is_some())?.take();
        w
    }

    /// Userspace's answer to the read of `len` bytes at `gpa`.
    pub(crate) fn push(&mut self, gpa: u64, len: u8, value: u64) {
        if let Some(slot) = self.data.get_mut(self.n) {
            *slot = (gpa, len, value);
            self.n += 1;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Ram,
    Apic,
    Mmio,
}

#[derive(Clone, Copy)]
pub(super) struct Write {
    pub(super) gpa: u64,
    pub(super) len: u8,
    pub(super) data: [u8; 8],
    target: Target,
}

/// What the page-table write path needs from an emulation: the only write must land
/// in the aligned word `word`, whose value at the instruction's read is recorded.
pub(in crate::vcpu) struct PtWord {
    /// Guest-physical address of the 8-byte word the fault wrote to.
    pub(in crate::vcpu) word: u64,
    /// The word as the instruction read it (an atomic load), if it read it.
    pub(in crate::vcpu) seen: Option<u64>,
}

pub(in crate::vcpu) struct GuestEnv<'a, const W: usize = MAX_WRITES, const S: usize = MAX_SEG_LOADS>
{
    v: &'a mut VcpuInner,
    vmcs: &'a CurrentVmcs,
    ctx: &'a PermCtx,
    user: bool,
    /// Linear addresses wrap at 32 bits outside 64-bit mode.
    la_mask: u64,
    /// MMIO reads answered so far and taken by this run of the instruction.
    reads_taken: usize,
    /// The MMIO read (or, with `PORT_KEY`, port read) that userspace must answer
    /// before the instruction can complete.
    pub(super) need: Option<(u64, u8)>,
    /// A port write of the instruction: (port, size, value).
    port_out: Option<(u16, u8, u64)>,
    /// The instruction's data accesses, for the guest's data breakpoints.
    accesses: [Option<DataAccess>; MAX_ACCESSES],
    writes: [Option<Write>; W],
    /// Page-table write path: only RAM, and the word it read.
    pub(super) pt: Option<PtWord>,
    /// The exit's own translation (no walk for that page).
    hint: Option<Hint>,
    /// The guest's vector registers are in `fx` (copied out of the CPU).
    fpu_synced: bool,
    /// A vector register the instruction loads: (register, value).
    vreg_write: Option<(u8, [u8; 32])>,
    /// Segment loads (SEGS index, segment): MOV Sreg and LDS & co. load one, far
    /// transfers, INT and IRET CS, a task switch all six.
    seg_loads: [Option<(usize, Seg)>; S],
    /// The system change the instruction makes, and its interrupt shadow.
    sys: Option<SysWrite>,
    shadow: Option<bool>,
}

/// What an emulated instruction does, taken out of its [`GuestEnv`] to be committed.
pub(in crate::vcpu) struct Effects<const W: usize = MAX_WRITES, const S: usize = MAX_SEG_LOADS> {
    writes: [Option<Write>; W],
    vreg_write: Option<(u8, [u8; 32])>,
    port_out: Option<(u16, u8, u64)>,
    seg_loads: [Option<(usize, Seg)>; S],
    sys: Option<SysWrite>,
    shadow: Option<bool>,
    breakpoints: u64,
    /// The device-memory or port read the instruction waits for.
    pub(in crate::vcpu) need: Option<(u64, u8)>,
}

impl<const W: usize, const S: usize> Effects<W, S> {
    /// Whether a write goes to device memory (userspace).
    pub(in crate::vcpu) fn device_writes(&self) -> bool {
        self.writes
            .iter()
            .flatten()
            .any(|w| w.target == Target::Mmio)
    }
}

/// Where XMM0 is in an FXSAVE/XSAVE image, and the XSAVE header's XSTATE_BV.
const FX_XMM: usize = 160;
const XSTATE_BV: usize = 512;
const XSTATE_SSE: u64 = 1 << 1;
const XSTATE_AVX: u64 = 1 << 2;

/// Where the upper halves of YMM0-15 are in the standard XSAVE format (CPUID leaf 0xD,
/// sub-leaf 2), if they fit the vCPU's area.
fn ymm_hi_offset() -> Option<usize> {
    let off = core::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize;
    (off >= 576 && off + 256 <= 1024).then_some(off)
}

/// YMMn from an XSAVE (or FXSAVE) image: a component the image marks as in its
/// initial state reads as zeros.
fn image_vreg(fx: &[u8; 1024], xsave: bool, n: u8) -> [u8; 32] {
    let n = usize::from(n & 15);
    let bv = u64::from_le_bytes(fx[XSTATE_BV..XSTATE_BV + 8].try_into().unwrap_or([0; 8]));
    let mut out = [0u8; 32];
    if !xsave || bv & XSTATE_SSE != 0 {
        out[..16].copy_from_slice(&fx[FX_XMM + 16 * n..FX_XMM + 16 * n + 16]);
    }
    if let (true, Some(off)) = (xsave && bv & XSTATE_AVX != 0, ymm_hi_offset()) {
        out[16..].copy_from_slice(&fx[off + 16 * n..off + 16 * n + 16]);
    }
    out
}

/// Writes YMMn into an XSAVE (or FXSAVE) image, marking its components in use (a
/// component that was in its initial state gets zeros for the other registers).
fn set_image_vreg(fx: &mut [u8; 1024], xsave: bool, n: u8, v: &[u8; 32]) {
    let n = usize::from(n & 15);
    if !xsave {
        fx[FX_XMM + 16 * n..FX_XMM + 16 * n + 16].copy_from_slice(&v[..16]);
        return;
    }
    let mut bv = u64::from_le_bytes(fx[XSTATE_BV..XSTATE_BV + 8].try_into().unwrap_or([0; 8]));
    if bv & XSTATE_SSE == 0 {
        fx[FX_XMM..FX_XMM + 256].fill(0);
        bv |= XSTATE_SSE;
    }
    fx[FX_XMM + 16 * n..FX_XMM + 16 * n + 16].copy_from_slice(&v[..16]);
    if let Some(off) = ymm_hi_offset() {
        if bv & XSTATE_AVX == 0 {
            fx[off..off + 256].fill(0);
            bv |= XSTATE_AVX;
        }
        fx[off + 16 * n..off + 16 * n + 16].copy_from_slice(&v[16..]);
    }
    fx[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
}

impl<'a> GuestEnv<'a> {
    /// The environment of one instruction.
    pub(in crate::vcpu) fn new(
        v: &'a mut VcpuInner,
        vmcs: &'a CurrentVmcs,
        ctx: &'a PermCtx,
        pt: Option<PtWord>,
    ) -> Self {
        Self::with_writes(v, vmcs, ctx, pt)
    }
}

impl<'a, const W: usize, const S: usize> GuestEnv<'a, W, S> {
    /// The environment with room for `W` write pieces.
    pub(in crate::vcpu) fn with_writes(
        v: &'a mut VcpuInner,
        vmcs: &'a CurrentVmcs,
        ctx: &'a PermCtx,
        pt: Option<PtWord>,
    ) -> Self {
        let user = v.guest_seg(vmcs, 5).ar >> 5 & 3 == 3;
        let la_mask = if v.long_mode_code(vmcs) {
            u64::MAX
        } else {
            0xffff_ffff
        };
        Self {
            v,
            vmcs,
            ctx,
            user,
            la_mask,
            reads_taken: 0,
            need: None,
            writes: [None; W],
            pt,
            hint: None,
            fpu_synced: false,
            vreg_write: None,
            port_out: None,
            accesses: [None; MAX_ACCESSES],
            seg_loads: [None; S],
            sys: None,
            shadow: None,
        }
    }

    /// What the instruction did, to commit.
    pub(in crate::vcpu) fn effects(&self) -> Effects<W, S> {
        Effects {
            writes: self.writes,
            vreg_write: self.vreg_write,
            port_out: self.port_out,
            seg_loads: self.seg_loads,
            sys: self.sys,
            shadow: self.shadow,
            breakpoints: self.breakpoints_hit(),
            need: self.need,
        }
    }

    fn translate(&mut self, la: u64, write: bool) -> Result<u64, Stop> {
        if let Some(h) = self.hint {
            if la >> 12 == h.la_page && (h.write || !write) {
                return Ok((h.gpa_page << 12) | (la & 0xfff));
            }
        }
        let slots = self.v.slots.clone();
        let access = Access {
            write,
            user: self.user,
            fetch: false,
        };
        let (mode, cr3) = (self.v.mode, self.v.cr3);
        match walker::walk(
            &mut self.v.walk_mem(&slots),
            mode,
            cr3,
            la,
            access,
            self.ctx,
        ) {
            Ok(w) => Ok(w.gpa),
            Err(f) if f.raced => Err(Stop::Retry),
            // A guest page table outside RAM: nothing the CPU would do here either.
            Err(f) if f.unbacked_table.is_some() => Err(Stop::Unsupported(0)),
            Err(f) => Err(Exception::page_fault(f.error_code, la).into()),
        }
    }

    fn target(&self, gpa: u64, len: u64, write: bool) -> Target {
        let ram = if write {
            self.v.slots.ptr_mut(gpa, len)
        } else {
            self.v.slots.ptr(gpa, len)
        };
        if ram.is_some() {
            Target::Ram
        } else if self.v.apic_page() == Some(gpa & !0xfff) {
            Target::Apic
        } else {
            Target::Mmio
        }
    }

    /// Splits `len` bytes at `la` into pieces within one page: (offset, gpa, length).
    fn pieces(
        &mut self,
        la: u64,
        len: usize,
        write: bool,
        mut each: impl FnMut(&mut Self, usize, u64, usize) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let mut done = 0;
        while done < len {
            let a = la.wrapping_add(done as u64) & self.la_mask;
            let n = (len - done).min((0x1000 - (a & 0xfff)) as usize);
            let gpa = self.translate(a, write)?;
            // Device memory goes to userspace in pieces of at most 8 bytes.
            let mut off = 0;
            while off < n {
                let m = (n - off).min(8);
                each(self, done + off, gpa + off as u64, m)?;
                off += m;
            }
            done += n;
        }
        Ok(())
    }

    fn mmio_read(&mut self, gpa: u64, len: u8) -> Result<u64, Stop> {
        let reads = &mut self.v.mmio_reads;
        if self.reads_taken < reads.n {
            let (g, l, value) = reads.data[self.reads_taken];
            if (g, l) == (gpa, len) {
                self.reads_taken += 1;
                return Ok(value);
            }
            // Not what the instruction reads now (userspace changed its state):
            // the answers from here on are stale.
            reads.n = self.reads_taken;
        }
        if reads.n >= MAX_MMIO_READS {
            return Err(Stop::Unsupported(0));
        }
        self.need = Some((gpa, len));
        Err(Stop::Retry)
    }

    fn note_access(&mut self, la: u64, len: usize, write: bool) {
        if let Some(slot) = self.accesses.iter_mut().find(|a| a.is_none()) {
            *slot = Some(DataAccess {
                la,
                len: len as u8,
                write,
            });
        }
    }

    /// The guest's enabled data breakpoints the instruction's accesses hit (DR6 bits).
    pub(super) fn breakpoints_hit(&self) -> u64 {
        let dr7 = self.v.dr[7];
        if dr7 & 0xff == 0 {
            return 0;
        }
        let drs = [self.v.dr[0], self.v.dr[1], self.v.dr[2], self.v.dr[3]];
        let mut list = [DataAccess {
            la: 0,
            len: 0,
            write: false,
        }; MAX_ACCESSES];
        let mut n = 0;
        for a in self.accesses.iter().flatten() {
            list[n] = *a;
            n += 1;
        }
        data_breakpoints_hit(dr7, &drs, &list[..n])
    }

    /// The only piece written, if there was exactly one and it went to RAM.
    pub(super) fn single_ram_write(&self) -> Option<Write> {
        let mut it = self.writes.iter().flatten();
        match (it.next(), it.next()) {
            (Some(w), None) if w.target == Target::Ram => Some(*w),
            _ => None,
        }
    }
}

impl<const W: usize, const S: usize> Env for GuestEnv<'_, W, S> {
    fn port_in(&mut self, port: u16, size: u8) -> Result<u64, Stop> {
        if self.pt.is_some() {
            return Err(Stop::Unsupported(0));
        }
        self.mmio_read(PORT_KEY | u64::from(port), size)
    }

    fn port_out(&mut self, port: u16, size: u8, value: u64) -> Result<(), Stop> {
        if self.pt.is_some() {
            return Err(Stop::Unsupported(0));
        }
        self.port_out = Some((port, size, value));
        Ok(())
    }

    fn vreg(&mut self, n: u8) -> [u8; 32] {
        if !self.fpu_synced {
            self.v.guest_fpu_to_memory();
            self.fpu_synced = true;
        }
        image_vreg(&self.v.fx.0, self.v.xsave, n)
    }

    fn set_vreg(&mut self, n: u8, v: [u8; 32]) {
        self.vreg_write = Some((n, v));
    }

    fn segment(&mut self, s: SegReg) -> Seg {
        self.v.guest_seg(self.vmcs, seg_index(s))
    }

    fn load_segment(&mut self, s: SegReg, seg: Seg) -> Result<(), Stop> {
        let slot = self
            .seg_loads
            .iter_mut()
            .find(|l| l.is_none())
            .ok_or(Stop::Unsupported(0))?;
        *slot = Some((seg_index(s), seg));
        Ok(())
    }

    fn control(&mut self) -> Result<Control, Stop> {
        let v = &self.v;
        let ldtr = v.guest_seg(self.vmcs, 7);
        let tr = v.guest_seg(self.vmcs, 6);
        Ok(Control {
            cr: [v.cr0, 0, v.cr2, v.cr3, v.cr4],
            gdtr: (
                self.vmcs.read(guest::GDTR_BASE),
                self.vmcs.read(guest::GDTR_LIMIT) as u16,
            ),
            idtr: (
                self.vmcs.read(guest::IDTR_BASE),
                self.vmcs.read(guest::IDTR_LIMIT) as u16,
            ),
            ldtr,
            tr,
        })
    }

    fn sys_write(&mut self, w: SysWrite) -> Result<(), Stop> {
        if self.pt.is_some() || self.sys.is_some() {
            return Err(Stop::Unsupported(0));
        }
        self.sys = Some(w);
        Ok(())
    }

    fn rdmsr(&mut self, index: u32) -> Result<u64, Stop> {
        self.v
            .get_msr(self.vmcs, index)
            .ok_or(Stop::Exception(Exception::GP0))
    }

    fn cpuid(&mut self, leaf: u32, sub: u32) -> Result<[u32; 4], Stop> {
        Ok(self.v.cpuid_values(leaf, sub))
    }

    fn interrupt_shadow(&mut self, mov_ss: bool) {
        self.shadow = Some(mov_ss);
    }

    fn read(&mut self, la: u64, buf: &mut [u8]) -> Result<(), Stop> {
        self.note_access(la, buf.len(), false);
        self.pieces(la, buf.len(), false, |env, off, gpa, n| {
            let Some(dst) = buf.get_mut(off..off + n) else {
                return Err(Stop::Unsupported(0));
            };
            match env.target(gpa, n as u64, false) {
                Target::Ram => {
                    let Some(p) = env.v.slots.ptr(gpa, n as u64) else {
                        return Err(Stop::Unsupported(0));
                    };
                    if let Some(pt) = env.pt.as_mut().filter(|pt| gpa & !7 == pt.word) {
                        // The word a page-table write changes: read it atomically, so
                        // that the write can be a compare-exchange against it. (A
                        // piece that overlaps the word but starts before it is not
                        // served from it: such a read is refused below.)
                        let Some(wp) = env.v.slots.ptr(pt.word, 8) else {
                            return Err(Stop::Unsupported(0));
                        };
                        // SAFETY: as above; `wp` is 8-byte aligned.
                        let word = unsafe { &*wp.cast::<core::sync::atomic::AtomicU64>() };
                        let value = word.load(core::sync::atomic::Ordering::SeqCst);
                        pt.seen.get_or_insert(value);
                        let bytes = pt.seen.unwrap_or(value).to_le_bytes();
                        let at = (gpa & 7) as usize;
                        match bytes.get(at..at + n) {
                            Some(b) => dst.copy_from_slice(b),
                            None => return Err(Stop::Unsupported(0)),
                        }
                        return Ok(());
                    }
                    // SAFETY: `n` bytes of a pinned guest page.
                    unsafe { ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), n) };
                }
                _ if env.pt.is_some() => return Err(Stop::Unsupported(0)),
                Target::Apic => {
                    let v = env.v.apic_mmio(gpa, n as u8, None).unwrap_or(0);
                    dst.copy_from_slice(&v.to_le_bytes()[..n]);
                }
                Target::Mmio => {
                    let v = env.mmio_read(gpa, n as u8)?;
                    dst.copy_from_slice(&v.to_le_bytes()[..n]);
                }
            }
            Ok(())
        })
    }

    fn write(&mut self, la: u64, data: &[u8]) -> Result<(), Stop> {
        self.note_access(la, data.len(), true);
        self.pieces(la, data.len(), true, |env, off, gpa, n| {
            let target = env.target(gpa, n as u64, true);
            if env.pt.is_some() && target != Target::Ram {
                return Err(Stop::Unsupported(0));
            }
            let mut bytes = [0u8; 8];
            match data.get(off..off + n) {
                Some(d) => bytes[..n].copy_from_slice(d),
                None => return Err(Stop::Unsupported(0)),
            }
            let Some(slot) = env.writes.iter_mut().find(|w| w.is_none()) else {
                return Err(Stop::Unsupported(0));
            };
            *slot = Some(Write {
                gpa,
                len: n as u8,
                data: bytes,
                target,
            });
            Ok(())
        })
    }
}

/// The pieces written that go to userspace, in order.
fn mmio_writes(writes: &[Option<Write>]) -> [Option<Write>; MAX_WRITES] {
    let mut out = [None; MAX_WRITES];
    for (slot, w) in out
        .iter_mut()
        .zip(writes.iter().flatten().filter(|w| w.target == Target::Mmio))
    {
        *slot = Some(*w);
    }
    out
}

/// The linear address of the instruction at `rip`: CS.base counts outside 64-bit code,
/// where addresses wrap at 32 bits.
pub(super) fn code_linear(vmcs: &CurrentVmcs, rip: u64, long: bool) -> u64 {
    if long {
        rip
    } else {
        vmcs.read(guest::CS_BASE).wrapping_add(rip) & 0xffff_ffff
    }
}

/// Data breakpoints an emulated instruction hit (DR6 B bits): a trap after the
/// instruction, pending for the next entry, which delivers the #DB and sets DR6.
pub(super) fn data_breakpoint_trap(vmcs: &CurrentVmcs, hit: u64) {
    if hit != 0 {
        let pending = vmcs.read(guest::PENDING_DBG_EXCEPTIONS);
        vmcs.write(
            guest::PENDING_DBG_EXCEPTIONS,
            pending | hit | ENABLED_BREAKPOINT,
        );
    }
}

/// The mode the emulator runs the guest's instruction in.
pub(in crate::vcpu) fn guest_mode(v: &VcpuInner, vmcs: &CurrentVmcs) -> Mode {
    let cs_ar = vmcs.read(guest::CS_ACCESS_RIGHTS);
    let ss_ar = vmcs.read(guest::SS_ACCESS_RIGHTS);
    let vm86 = vmcs.read(guest::RFLAGS) & RFlags::FLAGS_VM.bits() != 0;
    Mode {
        long: v.long_mode_code(vmcs),
        def32: cs_ar & (1 << 14) != 0,
        stack32: ss_ar & (1 << 14) != 0,
        protected: v.cr0 & CR0_PE != 0 && !vm86,
        cpl: if v.cr0 & CR0_PE == 0 {
            0
        } else {
            (ss_ar >> 5 & 3) as u8
        },
        align_check: v.cr0 & CR0_AM != 0,
        sse: v.cr4 & CR4_OSFXSR != 0 && v.cr0 & CR0_EM == 0,
        avx: v.xsave
            && v.cr4 & CR4_OSXSAVE != 0
            && v.xcr0 & (XSTATE_SSE | XSTATE_AVX) == XSTATE_SSE | XSTATE_AVX,
        ts: v.cr0 & CR0_TS != 0,
        // CR4.LA57 is reserved for rvmm's guests (no 5-level paging).
        la57: false,
    }
}

impl VcpuInner {
    /// The guest's registers as the emulator takes them.
    pub(in crate::vcpu) fn emu_regs(&self, vmcs: &CurrentVmcs) -> Regs {
        let mut gpr = [0u64; 16];
        for (n, slot) in gpr.iter_mut().enumerate() {
            *slot = self.gpr(vmcs, n as u8);
        }
        Regs {
            gpr,
            rip: vmcs.read(guest::RIP),
            rflags: vmcs.read(guest::RFLAGS),
        }
    }

    /// Writes back what an emulated instruction changed; `done`: it completed (RIP
    /// moves to `regs.rip`, as `retire` does for every completed instruction).
    pub(in crate::vcpu) fn emu_commit_regs(
        &mut self,
        vmcs: &CurrentVmcs,
        before: &Regs,
        regs: &Regs,
        done: Done,
    ) {
        for n in 0..16u8 {
            let v = regs.gpr[usize::from(n)];
            if v != before.gpr[usize::from(n)] {
                self.set_gpr(vmcs, n, v);
            }
        }
        // RFLAGS.VM is rvmm's while it runs real mode in vm86 (a mode switch may have
        // ended that under the instruction): the guest's flags without it.
        let vm = RFlags::FLAGS_VM.bits();
        let rflags = if self.real.vm86 {
            regs.rflags | vm
        } else if self.real.active || self.real.emulating {
            regs.rflags & !vm
        } else {
            regs.rflags
        };
        if rflags != vmcs.read(guest::RFLAGS) {
            vmcs.write(guest::RFLAGS, rflags);
        }
        if done == Done::Next {
            // A single step traps on the TF the instruction started with (POPF or
            // IRET that set it trap after the next one, one that cleared it after
            // itself).
            let tf = before.rflags & RFlags::FLAGS_TF.bits() != 0;
            self.retire_to_tf(vmcs, regs.rip, tf);
        }
    }

    /// Reads the instruction at the guest's RIP: its bytes and how many there are, or
    /// `None` if the page tables changed under the walk.
    pub(super) fn fetch_insn(
        &mut self,
        vmcs: &CurrentVmcs,
        ctx: &PermCtx,
    ) -> Option<([u8; 15], usize)> {
        let rip = vmcs.read(guest::RIP);
        let long = self.long_mode_code(vmcs);
        let mut code = [0u8; 15];
        let n = self.fetch_code(vmcs, code_linear(vmcs, rip, long), ctx, &mut code)?;
        Some((code, n))
    }

    /// An access to guest-physical memory that is not RAM (or a write to a read-only
    /// slot), or a string I/O instruction: the emulator carries out the instruction;
    /// device memory and ports it reads or writes go to userspace as MMIO and I/O
    /// exits (the xAPIC page stays in the kernel).
    pub(in crate::vcpu) fn emulate_insn(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        cause: Cause,
        hint: Option<Hint>,
    ) -> Next {
        let ctx = self.perm_ctx(vmcs);
        let rip = vmcs.read(guest::RIP);
        let mode = guest_mode(self, vmcs);
        let before = self.emu_regs(vmcs);
        let (code, insn, hint) = match self.mmio_reads.waiting {
            // Running again with userspace's answers: decoded and checked already.
            Some(w) if w.rip == rip && w.mode == mode => (w.code, Ok(w.insn), w.hint),
            _ => {
                let Some((code, n)) = self.fetch_insn(vmcs, &ctx) else {
                    // The instruction runs again (and exits again): its reads start over.
                    self.mmio_reads.clear();
                    return Next::Fast;
                };
                // Not the instruction that exited (the bytes changed since): it runs
                // again natively, with the CPU's checks.
                let insn = match rvmm_core::emulate::decode(&code[..n], mode.long, mode.def32) {
                    Ok(insn) if cause.allows(&insn, before.gpr[2]) => Ok(insn),
                    Ok(_) => {
                        self.mmio_reads.clear();
                        return Next::Fast;
                    }
                    Err(e) => Err(e),
                };
                // An instruction that runs past the code segment's limit is #GP(0)
                // (outside 64-bit mode): in vm86 that #GP is what exited, and the
                // emulator must not run the instruction anyway.
                if let Ok(i) = insn {
                    let last = rip.wrapping_add(u64::from(i.len) - 1);
                    if !mode.long && (last < rip || last > u64::from(self.guest_seg(vmcs, 0).limit))
                    {
                        self.mmio_reads.clear();
                        return self.emu_exception(vmcs, Exception::GP0);
                    }
                }
                (code, insn, hint)
            }
        };
        let mut regs = before;
        let mut env = GuestEnv::<MAX_WRITES>::new(self, vmcs, &ctx, None);
        env.hint = hint;
        let result = match insn {
            Ok(insn) => {
                rvmm_core::emulate::execute(&insn, &mode, &mut regs, &mut env).map(|d| (insn, d))
            }
            Err(e) => Err(rvmm_core::emulate::decode_stop(e)),
        };
        // Only a completed instruction has effects to take out; a retry needs the read
        // it waits for.
        let (fx, need) = match result {
            Ok(_) => (Some(env.effects()), None),
            Err(_) => (None, env.need),
        };
        match (result, fx) {
            (Ok((insn, done)), Some(fx)) => {
                self.mmio_reads.clear();
                // IRET in real mode ends the blocking of NMIs an NMI's delivery set.
                if self.real.active && insn.map == rvmm_core::emulate::Map::One && insn.op == 0xcf {
                    let s = vmcs.read(guest::INTERRUPTIBILITY_STATE);
                    vmcs.write(guest::INTERRUPTIBILITY_STATE, s & !8);
                }
                // A system change first: one the vCPU refuses (#GP) or must retry (a
                // flush in steps) leaves the instruction not done.
                if let Some(w) = fx.sys.filter(|w| *w != SysWrite::Halt) {
                    if let Err(n) = self.apply_sys_write(vmcs, run, w) {
                        return n;
                    }
                }
                let full = self.apply_effects(vmcs, &ctx, &fx);
                self.emu_commit_regs(vmcs, &before, &regs, done);
                if let Some(mov_ss) = fx.shadow {
                    let s = vmcs.read(guest::INTERRUPTIBILITY_STATE);
                    vmcs.write(
                        guest::INTERRUPTIBILITY_STATE,
                        s | if mov_ss { 2 } else { 1 },
                    );
                }
                self.mmio_reads.writes = mmio_writes(&fx.writes);
                data_breakpoint_trap(vmcs, fx.breakpoints);
                self.real_mode_refresh(vmcs);
                if full && !self.reload_root(vmcs, true) {
                    return self.no_shadow(vmcs, run, before.rip, 5);
                }
                if let Some((port, size, value)) = fx.port_out {
                    let io = IoAccess {
                        size,
                        input: false,
                        string: true,
                        rep: false,
                        port,
                    };
                    return self.io_exit(run, io, value & rvmm_core::emulate::flags::mask(size));
                }
                if fx.sys == Some(SysWrite::Halt) {
                    return self.hlt(vmcs, run);
                }
                self.next_mmio_write(run).unwrap_or(Next::Fast)
            }
            (Ok(_), None) => Next::Fast,
            (Err(Stop::Retry), _) => match need {
                Some((key, size)) if key & PORT_KEY != 0 => {
                    let io = IoAccess {
                        size,
                        input: true,
                        string: true,
                        rep: false,
                        port: key as u16,
                    };
                    self.pending = Pending::PortIn {
                        port: key as u16,
                        size,
                    };
                    if let Ok(insn) = insn {
                        self.mmio_reads.waiting = Some(Waiting {
                            rip,
                            mode,
                            code,
                            insn,
                            hint,
                            cause,
                        });
                    }
                    self.io_exit(run, io, 0)
                }
                Some((gpa, len)) => {
                    let exit = uapi::ExitMmio {
                        phys_addr: gpa,
                        len: len.into(),
                        ..Default::default()
                    };
                    // SAFETY: our run page.
                    unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).mmio), exit) };
                    self.pending = Pending::MmioRead { gpa, len };
                    if let Ok(insn) = insn {
                        self.mmio_reads.waiting = Some(Waiting {
                            rip,
                            mode,
                            code,
                            insn,
                            hint,
                            cause,
                        });
                    }
                    self.stats.mmio_exits.inc();
                    self.exit_to_user(run, uapi::RVMM_EXIT_MMIO)
                }
                // The page tables changed under a walk: the instruction runs again.
                None => {
                    self.mmio_reads.clear();
                    Next::Fast
                }
            },
            (Err(Stop::Exception(e)), _) => {
                self.mmio_reads.clear();
                self.emu_exception(vmcs, e)
            }
            (Err(Stop::Unsupported(op)), _) => {
                self.mmio_reads.clear();
                let first = u64::from_le_bytes(code[..8].try_into().unwrap_or([0; 8]));
                self.internal_error(
                    run,
                    uapi::RVMM_INTERNAL_EMULATION,
                    [u64::from(op), before.rip, first, 4],
                )
            }
        }
    }

    /// Makes a system change of an emulated instruction (before anything else of it).
    fn apply_sys_write(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        w: SysWrite,
    ) -> Result<(), Next> {
        match w {
            SysWrite::Cr(n, v) => self.write_cr(vmcs, run, n, v),
            SysWrite::Gdtr(base, limit) => {
                vmcs.write(guest::GDTR_BASE, base);
                vmcs.write(guest::GDTR_LIMIT, limit.into());
                Ok(())
            }
            SysWrite::Idtr(base, limit) => {
                vmcs.write(guest::IDTR_BASE, base);
                vmcs.write(guest::IDTR_LIMIT, limit.into());
                Ok(())
            }
            SysWrite::Msr(index, v) => {
                if self.set_msr(vmcs, index, v) {
                    Ok(())
                } else {
                    Err(self.inject(vmcs, vector::GP, Some(0)))
                }
            }
            SysWrite::Halt => Ok(()),
        }
    }

    /// Commits an instruction's memory, vector-register and segment changes; true if
    /// the pool was full doing so (the caller takes a new root).
    pub(in crate::vcpu) fn apply_effects<const W: usize, const S: usize>(
        &mut self,
        vmcs: &CurrentVmcs,
        ctx: &PermCtx,
        fx: &Effects<W, S>,
    ) -> bool {
        if let Some((n, v)) = fx.vreg_write {
            set_image_vreg(&mut self.fx.0, self.xsave, n, &v);
            self.guest_fpu_from_memory();
        }
        for (i, seg) in fx.seg_loads.iter().flatten() {
            self.set_guest_seg(vmcs, *i, *seg);
        }
        self.commit_writes(&fx.writes, ctx)
    }

    /// The next MMIO write of a completed instruction, as an exit to userspace (the
    /// instruction has retired: userspace sees its writes one exit at a time).
    pub(in crate::vcpu) fn next_mmio_write(&mut self, run: *mut uapi::Run) -> Option<Next> {
        let w = self.mmio_reads.next_write()?;
        let exit = uapi::ExitMmio {
            phys_addr: w.gpa,
            data: w.data,
            len: w.len.into(),
            is_write: 1,
            ..Default::default()
        };
        // SAFETY: our run page.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).mmio), exit) };
        self.pending = Pending::MmioWrite;
        self.stats.mmio_exits.inc();
        Some(self.exit_to_user(run, uapi::RVMM_EXIT_MMIO))
    }

    /// The exception an emulated instruction raises, delivered to the guest.
    pub(super) fn emu_exception(&mut self, vmcs: &CurrentVmcs, e: Exception) -> Next {
        if let Some(cr2) = e.cr2 {
            self.cr2 = cr2;
        }
        self.inject(vmcs, e.vector, e.error_code)
    }

    /// Makes an emulated instruction's writes to RAM and to the xAPIC; a write to a
    /// guest page table the pool write-protects updates the shadows as a trapped write
    /// would. True if the pool was full doing so.
    fn commit_writes(&mut self, writes: &[Option<Write>], ctx: &PermCtx) -> bool {
        let mut full = false;
        for w in writes.iter().flatten() {
            match w.target {
                Target::Ram => {
                    if let Some(p) = self.slots.ptr_mut(w.gpa, w.len.into()) {
                        // SAFETY: `len` bytes of a pinned, writable guest page.
                        unsafe { ptr::copy_nonoverlapping(w.data.as_ptr(), p, usize::from(w.len)) };
                        full |= self.ram_written(w.gpa, w.len, ctx);
                    }
                }
                Target::Apic => {
                    let v = u64::from_le_bytes(w.data);
                    self.apic_mmio(w.gpa, w.len, Some(v));
                }
                Target::Mmio => {}
            }
        }
        full
    }

    /// The host wrote `len` bytes of guest RAM at `gpa` for the guest: if that is a
    /// page table the pool shadows, its shadows follow. True if the pool was full.
    fn ram_written(&mut self, gpa: u64, len: u8, ctx: &PermCtx) -> bool {
        let mut guard = self.shadow.pool.lock();
        let Some(storage) = guard.as_deref_mut() else {
            return false;
        };
        let mut pool = storage.pool();
        let full = pool.protected(gpa >> 12)
            && pool.st.generation == self.proot_gen
            && pool
                .pt_written(&mut GuestMem(&self.slots), gpa, len, ctx)
                .is_err();
        self.shadow.settle(&mut pool);
        full
    }
}

/// Instructions that load a segment register or switch the instruction stream: far
/// JMP/CALL/RET, IRET, INT n, MOV/POP to a segment register, LDS & co.
fn loads_segment(insn: &Insn) -> bool {
    use rvmm_core::emulate::Map;
    match insn.map {
        Map::One => {
            matches!(
                insn.op,
                0x07 | 0x17 | 0x1f | 0x8e | 0x9a | 0xea | 0xc4 | 0xc5 | 0xca..=0xcf
            ) || (insn.op == 0xff && matches!(insn.reg & 7, 3 | 5))
        }
        Map::Two => matches!(insn.op, 0xa1 | 0xa9 | 0xb2 | 0xb4 | 0xb5),
        Map::Three38 => false,
    }
}

/// Whether the page-table write path emulates `insn`: a single write, no REP string
/// (a table being cleared by REP STOS is unprotected instead, and cleared natively),
/// and nothing beyond memory and registers to commit (that path commits the write and
/// RIP only: a segment load or a system change is the full emulator's).
pub(super) fn pt_emulates(insn: &Insn) -> bool {
    use rvmm_core::emulate::Map;
    !(insn.map == Map::One && matches!(insn.op, 0xa4..=0xa7 | 0xaa..=0xaf))
        && !loads_segment(insn)
        && !system_insn(insn)
}
