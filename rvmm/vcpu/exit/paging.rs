// SPDX-License-Identifier: GPL-2.0

//! Page faults under the shadow pool (fill, the guest's own fault, MMIO, writes to
//! write-protected page tables emulated), MMIO decoding, INVLPG and INVPCID.

use rvmm_core::mmu::invpcid::{self, Invpcid};
use rvmm_core::mmu::pdptes::WithPdptes;

use super::*;

/// The linear address of the instruction at `rip`: CS.base counts outside 64-bit code,
/// where addresses wrap at 32 bits.
fn code_linear(vmcs: &CurrentVmcs, rip: u64, long: bool) -> u64 {
    if long {
        rip
    } else {
        vmcs.read(guest::CS_BASE).wrapping_add(rip) & 0xffff_ffff
    }
}

impl VcpuInner {
    /// A #PF in the guest: fill the shadow from the guest's tables, or give the guest
    /// the fault its tables call for.
    pub(super) fn page_fault(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        gva: u64,
        ec: u32,
    ) -> Next {
        let access = Access::from_error_code(ec);
        let ctx = self.perm_ctx(vmcs);
        if self.on_pool {
            // A reserved-bit fault can only come from an MMIO entry of the pool: the
            // guest-physical address is in it, no guest walk needed.
            if ec & (1 << 3) != 0 {
                let gpa = match self.shadow.pool.lock().as_deref_mut() {
                    Some(storage) => {
                        let mut pool = storage.pool();
                        match self.proot {
                            Some(root) if pool.st.generation == self.proot_gen => {
                                pool.mmio_fast(root, gva, access, &ctx)
                            }
                            _ => None,
                        }
                    }
                    None => None,
                };
                if let Some(gpa) = gpa {
                    return self.mmio(vmcs, run, gpa, &ctx);
                }
            }
            return self.pool_fault(vmcs, run, gva, ec, access, &ctx);
        }
        // No shadow (the VM's pool could not give a root): nothing to fix.
        self.internal_error(
            run,
            uapi::RVMM_INTERNAL_NO_SHADOW,
            [gva, u64::from(ec), vmcs.read(guest::RIP), 0],
        )
    }

    /// An access to guest-physical memory that is not RAM (or a write to a read-only
    /// slot): decode the instruction and hand the access to userspace.
    pub(super) fn mmio(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        gpa: u64,
        ctx: &PermCtx,
    ) -> Next {
        let rip = vmcs.read(guest::RIP);
        let cs_ar = vmcs.read(guest::CS_ACCESS_RIGHTS);
        let long = self.efer & EFER_LMA != 0 && cs_ar & (1 << 13) != 0;
        let mut code = [0u8; 15];
        let Some(n) = self.fetch_code(vmcs, code_linear(vmcs, rip, long), ctx, &mut code) else {
            return Next::Fast;
        };
        let decoded = match rvmm_core::emulate::decode(&code[..n], long, cs_ar & (1 << 14) != 0) {
            Ok(d) => d,
            Err(_) => {
                let first = u64::from_le_bytes(code[..8].try_into().unwrap_or([0; 8]));
                return self.internal_error(
                    run,
                    uapi::RVMM_INTERNAL_EMULATION,
                    [gpa, rip, first, 4],
                );
            }
        };
        if self.apic_page() == Some(gpa & !0xfff) {
            return self.apic_page_access(vmcs, gpa, rip, decoded, long);
        }
        let mut mmio = uapi::ExitMmio {
            phys_addr: gpa,
            ..Default::default()
        };
        match decoded.op {
            MmioOp::Store { size, src } => {
                let v = match src {
                    Source::Reg(r) => self.gpr(vmcs, r),
                    Source::HighByte(r) => self.gpr(vmcs, r) >> 8,
                    Source::Imm(v) => v,
                };
                mmio.len = size.into();
                mmio.is_write = 1;
                mmio.data = v.to_le_bytes();
                for b in mmio.data.iter_mut().skip(usize::from(size)) {
                    *b = 0;
                }
            }
            MmioOp::Load { size, .. } => {
                mmio.len = size.into();
                self.pending = Pending::MmioRead {
                    op: decoded.op,
                    long,
                };
            }
        }
        // SAFETY: our run page.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).mmio), mmio) };
        self.retire(vmcs, rip, decoded.len.into());
        self.stats.mmio_exits.inc();
        self.exit_to_user(run, uapi::RVMM_EXIT_MMIO)
    }

    /// A decoded access to the xAPIC page, done in the kernel.
    pub(super) fn apic_page_access(
        &mut self,
        vmcs: &CurrentVmcs,
        gpa: u64,
        rip: u64,
        decoded: rvmm_core::emulate::Decoded,
        long: bool,
    ) -> Next {
        match decoded.op {
            MmioOp::Store { size, src } => {
                let v = match src {
                    Source::Reg(r) => self.gpr(vmcs, r),
                    Source::HighByte(r) => self.gpr(vmcs, r) >> 8,
                    Source::Imm(v) => v,
                };
                self.apic_mmio(gpa, size, Some(v));
            }
            MmioOp::Load { size, dst, .. } => {
                let data = self.apic_mmio(gpa, size, None).unwrap_or(0);
                let new =
                    rvmm_core::emulate::load_result(self.gpr(vmcs, dst), data, &decoded.op, long);
                self.set_gpr(vmcs, dst, new);
            }
        }
        self.retire(vmcs, rip, decoded.len.into());
        Next::Fast
    }

    /// Reads up to 15 bytes of code at linear address `rip`; returns how many, or
    /// `None` if other vCPUs kept changing the page tables under the walk (the
    /// instruction is to run again).
    pub(super) fn fetch_code(
        &mut self,
        vmcs: &CurrentVmcs,
        rip: u64,
        ctx: &PermCtx,
        out: &mut [u8; 15],
    ) -> Option<usize> {
        let slots = self.slots.clone();
        let fetch = Access {
            write: false,
            user: vmcs.read(guest::SS_ACCESS_RIGHTS) >> 5 & 3 == 3,
            fetch: true,
        };
        // Linear addresses wrap at 32 bits outside 64-bit mode, at 64 bits in it.
        let mask = if self.long_mode_code(vmcs) {
            u64::MAX
        } else {
            0xffff_ffff
        };
        let mut n = 0;
        while n < out.len() {
            let la = rip.wrapping_add(n as u64) & mask;
            let w = match walker::walk(
                &mut self.walk_mem(&slots),
                self.mode,
                self.cr3,
                la,
                fetch,
                ctx,
            ) {
                Ok(w) => w,
                Err(f) if f.raced => return None,
                Err(_) => break,
            };
            let chunk = ((0x1000 - (w.gpa & 0xfff)) as usize).min(out.len() - n);
            let Some(p) = slots.ptr(w.gpa, chunk as u64) else {
                break;
            };
            // SAFETY: `p` points at `chunk` bytes of a pinned guest page.
            unsafe { ptr::copy_nonoverlapping(p, out[n..].as_mut_ptr(), chunk) };
            n += chunk;
        }
        Some(n)
    }

    /// A #PF under the VM's pool: sync the missing entry (or report the guest's fault,
    /// or MMIO).
    pub(super) fn pool_fault(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        gva: u64,
        ec: u32,
        access: Access,
        ctx: &PermCtx,
    ) -> Next {
        let (pdpt, regs) = self.pdpte_regs();
        let (fix, spurious) = {
            let mut guard = self.shadow.pool.lock();
            let Some(storage) = guard.as_deref_mut() else {
                drop(guard);
                return self.internal_error(run, uapi::RVMM_INTERNAL_NO_SHADOW, [gva, 1, 0, 0]);
            };
            let mut pool = storage.pool();
            let spurious_before = pool.st.stats.spurious_faults;
            let fix = match self.proot {
                Some(root) if pool.st.generation == self.proot_gen => Some(pool.page_fault(
                    &mut WithPdptes {
                        mem: GuestMem(&self.slots),
                        pdpt,
                        regs,
                    },
                    root,
                    self.cr3,
                    gva,
                    access,
                    ctx,
                )),
                _ => None,
            };
            let spurious = pool.st.stats.spurious_faults != spurious_before;
            self.shadow.settle(&mut pool);
            drop(guard);
            (fix, spurious)
        };
        match fix {
            // The pool was reset (full): load the root again and retry the access.
            None | Some(Err(_)) => {
                if !self.reload_root(vmcs, matches!(fix, Some(Err(_)))) {
                    return self.no_shadow(vmcs, run, gva, 0);
                }
                Next::Fast
            }
            Some(Ok(PoolFix::Mapped)) => {
                self.stats.shadow_faults.inc();
                let rip = vmcs.read(guest::RIP);
                // A loop is a fault the pool "fixes" without changing anything, again
                // and again. A fault that filled an entry is progress, however often
                // the guest comes back to the same address and instruction (a test
                // that rewrites a PTE and INVLPGs it before every access, as
                // kvm-unit-tests' access.c does, faults there every time).
                if spurious && (gva, rip) == self.last_fault {
                    self.repeat_faults += 1;
                    if self.repeat_faults > 64 {
                        self.repeat_faults = 0;
                        user_pr!(
                            pr_err,
                            "shadow fault loop (pool): gva {:#x} ec {:#x} rip {:#x}\n",
                            gva,
                            ec,
                            rip
                        );
                        return self.internal_error(
                            run,
                            uapi::RVMM_INTERNAL_NO_SHADOW,
                            [gva, u64::from(ec), rip, 0],
                        );
                    }
                } else {
                    self.last_fault = (gva, rip);
                    self.repeat_faults = 0;
                }
                Next::Fast
            }
            Some(Ok(PoolFix::GuestFault(f))) => {
                if let Some(table) = f.unbacked_table {
                    return self.internal_error(
                        run,
                        uapi::RVMM_INTERNAL_EMULATION,
                        [table, gva, vmcs.read(guest::RIP), 1],
                    );
                }
                self.stats.guest_faults.inc();
                self.cr2 = gva;
                self.inject(vmcs, vector::PF, Some(f.error_code))
            }
            Some(Ok(PoolFix::Mmio { gpa, .. })) => self.mmio(vmcs, run, gpa, ctx),
            Some(Ok(PoolFix::WriteProtected { gpa, .. })) => {
                self.pt_write(vmcs, run, gva, gpa, ctx)
            }
            // The guest faults again and the sync goes on (not a fault loop).
            Some(Ok(PoolFix::Retry)) => Next::Fast,
        }
    }

    /// A write to a write-protected upper-level guest page table: emulate the
    /// instruction (MOV, XCHG, CMPXCHG, OR, AND, BTS, BTR), then let the pool update the
    /// shadow entries it covers. What the emulator does not handle unsyncs the table
    /// instead, and the instruction runs again natively.
    pub(super) fn pt_write(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        gva: u64,
        gpa: u64,
        ctx: &PermCtx,
    ) -> Next {
        let rip = vmcs.read(guest::RIP);
        let cs_ar = vmcs.read(guest::CS_ACCESS_RIGHTS);
        let long = self.efer & EFER_LMA != 0 && cs_ar & (1 << 13) != 0;
        // Not emulated (the table is unprotected and the guest runs on): a write the
        // CPU made while delivering an event (pushing its frame: the instruction at RIP
        // did not run; the event is delivered again), and an instruction under single
        // step (run natively, it raises its own #DB).
        let vectoring = vmcs.read(ro::IDT_VECTORING_INFO) as u32 & intr::VALID != 0;
        let single_step = vmcs.read(guest::RFLAGS) & (1 << 8) != 0;
        let op = if vectoring || single_step {
            None
        } else {
            let mut code = [0u8; 15];
            let Some(n) = self.fetch_code(vmcs, code_linear(vmcs, rip, long), ctx, &mut code)
            else {
                // The instruction runs again.
                return Next::Fast;
            };
            rvmm_core::emulate::decode_write(&code[..n], long, cs_ar & (1 << 14) != 0).ok()
        };
        let emulated = match op {
            // Within one naturally aligned 8-byte word (entries are), so that the
            // read-modify-write is one atomic compare-exchange on it: other vCPUs may
            // write the same table at the same time (their writes trap as well, but the
            // emulation runs outside the pool lock).
            Some(op) if (gpa & 7) + u64::from(op.size) <= 8 => {
                match self.slots.ptr_mut(gpa & !7, 8) {
                    Some(p) => {
                        // SAFETY: `p` is an 8-byte aligned pointer into a pinned guest page
                        // (`ptr` checked the range); the guest and other vCPUs only access it
                        // as memory, so atomic accesses through it are sound.
                        let word = unsafe { &*p.cast::<core::sync::atomic::AtomicU64>() };
                        let shift = 8 * (gpa & 7);
                        let mask = if op.size == 8 {
                            u64::MAX
                        } else {
                            ((1u64 << (8 * u32::from(op.size))) - 1) << shift
                        };
                        let src = match op.src {
                            Source::Reg(r) => self.gpr(vmcs, r),
                            Source::HighByte(r) => self.gpr(vmcs, r) >> 8,
                            Source::Imm(v) => v,
                        };
                        let (rax, rflags) = (self.gprs.rax, vmcs.read(guest::RFLAGS));
                        let (edx_eax, ecx_ebx) = (
                            (self.gprs.rdx << 32) | (rax & 0xffff_ffff),
                            (self.gprs.rcx << 32) | (self.gprs.rbx & 0xffff_ffff),
                        );
                        let mut cur = word.load(core::sync::atomic::Ordering::SeqCst);
                        let e = loop {
                            let old = (cur & mask) >> shift;
                            let e = if op.kind == WriteKind::Cmpxchg8b {
                                let (mem, reg, rflags) = rvmm_core::emulate::apply_cmpxchg8b(
                                    old, edx_eax, ecx_ebx, rflags,
                                );
                                rvmm_core::emulate::WriteEffect {
                                    mem,
                                    reg: reg.map(|v| (0, v)),
                                    rflags,
                                }
                            } else {
                                rvmm_core::emulate::apply_write(&op, old, src, rax, rflags)
                            };
                            let next = (cur & !mask) | ((e.mem << shift) & mask);
                            match word.compare_exchange(
                                cur,
                                next,
                                core::sync::atomic::Ordering::SeqCst,
                                core::sync::atomic::Ordering::SeqCst,
                            ) {
                                Ok(_) => break e,
                                Err(now) => cur = now,
                            }
                        };
                        if let (WriteKind::Cmpxchg8b, Some((_, v))) = (op.kind, e.reg) {
                            // EDX:EAX (32-bit writes: the upper halves clear).
                            self.gprs.rax = v & 0xffff_ffff;
                            self.gprs.rdx = v >> 32;
                        } else if let Some((_, v)) = e.reg {
                            // XCHG: the source register; CMPXCHG: rAX. Merged as a MOV
                            // of the operand size (32-bit results zero-extend).
                            let (r, shift) = match (op.kind, op.src) {
                                (WriteKind::Xchg, Source::HighByte(h)) => (h, 8),
                                (WriteKind::Xchg, Source::Reg(r)) => (r, 0),
                                _ => (0, 0),
                            };
                            let merged = match op.size {
                                8 => v,
                                4 => v & 0xffff_ffff,
                                2 => (self.gpr(vmcs, r) & !0xffff) | (v & 0xffff),
                                _ => (self.gpr(vmcs, r) & !(0xff << shift)) | ((v & 0xff) << shift),
                            };
                            self.set_gpr(vmcs, r, merged);
                        }
                        vmcs.write(guest::RFLAGS, e.rflags);
                        self.retire(vmcs, rip, op.len.into());
                        Some(op.size)
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let r = {
            let mut guard = self.shadow.pool.lock();
            match guard.as_deref_mut() {
                Some(storage) => {
                    let mut pool = storage.pool();
                    let r = match emulated {
                        // The pool was reset since the fault (perhaps for a new memory
                        // map this vCPU does not have yet): it has no shadow of the
                        // table to update, and must not get one from this vCPU's map.
                        _ if pool.st.generation != self.proot_gen => Ok(()),
                        Some(size) => pool.pt_written(&mut GuestMem(&self.slots), gpa, size, ctx),
                        None => {
                            pool.unprotect(gpa >> 12);
                            Ok(())
                        }
                    };
                    self.shadow.settle(&mut pool);
                    r
                }
                None => Ok(()),
            }
        };
        if r.is_err() && !self.reload_root(vmcs, true) {
            return self.no_shadow(vmcs, run, gva, 4);
        }
        Next::Fast
    }

    /// After a pool operation (lock released): a new root if the pool was full
    /// (`Some(Err)`) or reset under this vCPU (`None`). False if no root can be had.
    pub(super) fn finish_pool_op(
        &mut self,
        vmcs: &CurrentVmcs,
        r: Option<Result<(), rvmm_core::mmu::pool::Full>>,
    ) -> bool {
        match r {
            Some(Ok(())) => true,
            Some(Err(_)) => self.reload_root(vmcs, true),
            None => self.reload_root(vmcs, false),
        }
    }

    /// The pool is full (`full`: reset it), or was reset under this vCPU: load this
    /// vCPU's root again. False if even that fails.
    pub(super) fn reload_root(&mut self, vmcs: &CurrentVmcs, full: bool) -> bool {
        if full {
            if let Some(storage) = self.shadow.pool.lock().as_deref_mut() {
                let mut pool = storage.pool();
                pool.reset();
                self.shadow.settle(&mut pool);
            }
            self.stats.shadow_resets.inc();
        }
        self.reset_shadow(vmcs)
    }

    /// No shadow for the guest (the pool cannot give a root): the vCPU stops with an
    /// internal error; `site` says where.
    pub(super) fn no_shadow(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        gva: u64,
        site: u64,
    ) -> Next {
        self.internal_error(
            run,
            uapi::RVMM_INTERNAL_NO_SHADOW,
            [gva, 0, vmcs.read(guest::RIP), site],
        )
    }

    pub(super) fn invlpg(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, gva: u64) -> Next {
        if self.on_pool {
            if self
                .shadow
                .modes
                .unsync
                .load(core::sync::atomic::Ordering::Acquire)
                != 0
                && self.sync_late()
            {
                // Its sync may take a step's work: in the next section.
                return Next::Host;
            }
            let ctx = self.perm_ctx(vmcs);
            let mut done = true;
            // None: no root, or one from an older pool generation.
            let r = match self.shadow.pool.lock().as_deref_mut() {
                Some(storage) => {
                    let mut pool = storage.pool();
                    match self.proot {
                        Some(root) if pool.st.generation == self.proot_gen => {
                            let r = pool.invlpg(
                                &mut GuestMem(&self.slots),
                                root,
                                gva,
                                &ctx,
                                SYNC_BUDGET,
                            );
                            self.shadow.settle(&mut pool);
                            Some(r.map(|d| done = d))
                        }
                        _ => None,
                    }
                }
                None => None,
            };
            let ok = self.finish_pool_op(vmcs, r);
            if !ok {
                return self.no_shadow(vmcs, run, gva, 2);
            }
            if !done {
                // The sync goes on when the guest runs INVLPG again.
                return self.sync_pause();
            }
            self.skip_instruction(vmcs);
            return Next::Fast;
        }
        self.skip_instruction(vmcs);
        Next::Fast
    }

    /// One step of a global flush's sync (every out-of-sync shadow, see
    /// `Pool::flush_all`): `Some(false)` while some are left (the flushing instruction
    /// runs again), `None` if no root can be had.
    pub(super) fn flush_all_step(&mut self, vmcs: &CurrentVmcs) -> Option<bool> {
        if !self.on_pool
            || self
                .shadow
                .modes
                .unsync
                .load(core::sync::atomic::Ordering::Acquire)
                == 0
        {
            // What went out of sync since the count was published is synced with the
            // new root (under the pool lock).
            return Some(true);
        }
        if self.sync_late() {
            return Some(false);
        }
        let ctx = self.perm_ctx(vmcs);
        let mut done = true;
        // None: no root, or one from an older pool generation (or there is no pool).
        let r = match self.shadow.pool.lock().as_deref_mut() {
            Some(storage) => {
                let mut pool = storage.pool();
                if pool.st.generation != self.proot_gen {
                    None
                } else {
                    let r = pool.flush_all(&mut GuestMem(&self.slots), &ctx, SYNC_BUDGET);
                    self.shadow.settle(&mut pool);
                    Some(r.map(|d| done = d))
                }
            }
            None => None,
        };
        self.finish_pool_op(vmcs, r).then_some(done)
    }

    /// INVPCID (SDM Vol. 2A): type 0 invalidates one address of one PCID, 1 one PCID,
    /// 2 and 3 every PCID. The shadow is shared by PCIDs: type 0 for the current PCID is
    /// an INVLPG, anything else brings every out-of-sync shadow up to date.
    pub(super) fn invpcid(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, qual: u64) -> Next {
        // Segment bases in instruction-information order: ES CS SS DS FS GS.
        const SEG_BASES: [u32; 6] = [
            guest::ES_BASE,
            guest::CS_BASE,
            guest::SS_BASE,
            guest::DS_BASE,
            guest::FS_BASE,
            guest::GS_BASE,
        ];
        let slots = self.slots.clone();
        if vmcs.read(guest::CS_ACCESS_RIGHTS) >> 5 & 3 != 0 {
            return self.inject(vmcs, vector::GP, Some(0));
        }
        let op = MemOperand::decode(vmcs.read(ro::VMEXIT_INSTRUCTION_INFO) as u32);
        let kind = self.gpr(vmcs, op.reg2);
        // 64-bit mode (not compatibility mode): flat segments but FS and GS, 64-bit
        // addresses.
        let long = self.long_mode_code(vmcs);
        let ea = op.effective(qual, |r| self.gpr(vmcs, r));
        let seg_base = match op.seg {
            4 => vmcs.read(guest::FS_BASE),
            5 => vmcs.read(guest::GS_BASE),
            s if !long => vmcs.read(SEG_BASES[usize::from(s).min(5)]),
            _ => 0,
        };
        let mask = if long { u64::MAX } else { 0xffff_ffff };
        let la = seg_base.wrapping_add(ea) & mask;
        if !invpcid::operand_ok(la, long) {
            let v = if op.seg == 2 { vector::SS } else { vector::GP };
            return self.inject(vmcs, v, Some(0));
        }
        // The 16-byte descriptor: PCID in bits 11:0, bits 63:12 reserved, the linear
        // address in bits 127:64. Any alignment (m128 has no alignment rule), across a
        // page boundary too.
        let mut bytes = [0u8; 16];
        let ctx = self.perm_ctx(vmcs);
        let read = Access::default();
        let mut n = 0;
        while n < bytes.len() {
            let a = la.wrapping_add(n as u64) & mask;
            match walker::walk(
                &mut self.walk_mem(&slots),
                self.mode,
                self.cr3,
                a,
                read,
                &ctx,
            ) {
                Ok(w) => {
                    let chunk = ((0x1000 - (w.gpa & 0xfff)) as usize).min(bytes.len() - n);
                    let Some(p) = slots.ptr(w.gpa, chunk as u64) else {
                        return self.internal_error(
                            run,
                            uapi::RVMM_INTERNAL_EMULATION,
                            [a, w.gpa, vmcs.read(guest::RIP), 5],
                        );
                    };
                    // SAFETY: `p` points at `chunk` bytes of a pinned guest page.
                    unsafe { ptr::copy_nonoverlapping(p, bytes[n..].as_mut_ptr(), chunk) };
                    n += chunk;
                }
                // Other vCPUs keep changing the entries: INVPCID runs again.
                Err(f) if f.raced => return Next::Fast,
                Err(f) => {
                    self.cr2 = a;
                    return self.inject(vmcs, vector::PF, Some(f.error_code));
                }
            }
        }
        let half = |h: &[u8]| u64::from_le_bytes(h.try_into().unwrap_or([0; 8]));
        let desc = [half(&bytes[..8]), half(&bytes[8..])];
        let pcide = self.cr4 & CR4_PCIDE != 0;
        let current = if pcide { self.cr3 & 0xfff } else { 0 };
        match invpcid::decide(kind, desc, pcide, current) {
            Invpcid::Fault => return self.inject(vmcs, vector::GP, Some(0)),
            // Like INVLPG (which skips the instruction itself).
            Invpcid::Address(addr) => return self.invlpg(vmcs, run, addr),
            Invpcid::Flush => {}
        }
        match self.flush_all_step(vmcs) {
            Some(true) => {}
            // The sync goes on when the guest runs INVPCID again.
            Some(false) => return self.sync_pause(),
            None => return self.no_shadow(vmcs, run, desc[1], 3),
        }
        self.skip_instruction(vmcs);
        Next::Fast
    }
}
