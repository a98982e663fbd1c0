// SPDX-License-Identifier: GPL-2.0

//! Page faults under the shadow pool (fill, the guest's own fault, MMIO, writes to
//! write-protected page tables emulated), MMIO decoding, INVLPG and INVPCID.

use rvmm_core::mmu::invpcid::{self, Invpcid};
use rvmm_core::mmu::pdptes::WithPdptes;

use super::*;

/// Stores the low `len` bytes of `v` at byte `off` of the aligned guest word at `p` as
/// one atomic store, when `len` is 1, 2, 4 or 8 and `off` a multiple of it; else false.
fn store_exact(p: *mut u8, off: u64, len: u8, v: u64) -> bool {
    use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
    if !matches!(len, 1 | 2 | 4 | 8) || off % u64::from(len) != 0 || off + u64::from(len) > 8 {
        return false;
    }
    // SAFETY: `p` is an 8-byte aligned pointer into a pinned guest page and
    // `off + len <= 8` with `off` a multiple of `len`: the target is naturally aligned
    // within the word; the guest only accesses it as memory.
    unsafe {
        let t = p.add(off as usize);
        match len {
            1 => (*t.cast::<AtomicU8>()).store(v as u8, Ordering::SeqCst),
            2 => (*t.cast::<AtomicU16>()).store(v as u16, Ordering::SeqCst),
            4 => (*t.cast::<AtomicU32>()).store(v as u32, Ordering::SeqCst),
            _ => (*t.cast::<AtomicU64>()).store(v, Ordering::SeqCst),
        }
    }
    true
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
            // emulator takes the instruction (it walks the guest's tables itself).
            if ec & (1 << 3) != 0 {
                let device = match self.shadow.pool.lock().as_deref_mut() {
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
                if let Some(gpa) = device {
                    return self.mmio(vmcs, run, gva, gpa, access.write);
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
    /// slot): the emulator carries out the instruction (see `emulate_insn`). Not while
    /// the CPU was delivering an event (its frame or IDT in device memory): the
    /// instruction at RIP did not run, and that delivery is not emulated (KVM stops the
    /// same way).
    /// `gva` faulted with an access (`write` or a read) that the pool checked, to `gpa`.
    pub(super) fn mmio(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        gva: u64,
        gpa: u64,
        write: bool,
    ) -> Next {
        let vectoring = vmcs.read(ro::IDT_VECTORING_INFO);
        if vectoring as u32 & intr::VALID != 0 {
            self.mmio_reads.clear();
            return self.internal_error(
                run,
                uapi::RVMM_INTERNAL_EMULATION,
                [vectoring, vmcs.read(guest::RIP), 0, 6],
            );
        }
        let hint = emulate::Hint {
            la_page: gva >> 12,
            gpa_page: gpa >> 12,
            write,
        };
        self.emulate_insn(vmcs, run, emulate::Cause::Mmio, Some(hint))
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
            Some(Ok(PoolFix::Mmio { gpa, .. })) => self.mmio(vmcs, run, gva, gpa, access.write),
            Some(Ok(PoolFix::WriteProtected { gpa, .. })) => {
                self.pt_write(vmcs, run, gva, gpa, ctx)
            }
            // The guest faults again and the sync goes on (not a fault loop).
            Some(Ok(PoolFix::Retry)) => Next::Fast,
        }
    }

    /// A write to a write-protected upper-level guest page table: the emulator carries
    /// out the instruction, its write made as one compare-exchange on the entry's
    /// aligned word (other vCPUs may write the same table at once: their writes trap
    /// as well, but the emulation runs outside the pool lock); then the pool updates
    /// the shadow entries the write covers. What is not emulated here unprotects the
    /// table instead, and the instruction runs again natively.
    pub(super) fn pt_write(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        gva: u64,
        gpa: u64,
        ctx: &PermCtx,
    ) -> Next {
        // Not emulated: a write the CPU made while delivering an event (pushing its
        // frame: the instruction at RIP did not run; the event is delivered again),
        // and an instruction under single step (run natively, it raises its own #DB).
        let vectoring = vmcs.read(ro::IDT_VECTORING_INFO) as u32 & intr::VALID != 0;
        let single_step = vmcs.read(guest::RFLAGS) & RFlags::FLAGS_TF.bits() != 0;
        let emulated = if vectoring || single_step {
            Some(None)
        } else {
            self.pt_emulate(vmcs, gpa, ctx)
        };
        let Some(emulated) = emulated else {
            // The page tables changed under a walk: the instruction runs again.
            return Next::Fast;
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
                        Some((at, size)) => {
                            pool.pt_written(&mut GuestMem(&self.slots), at, size, ctx)
                        }
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

    /// Emulates the instruction that wrote the page table at `gpa`: `Some(Some((at,
    /// size)))` when it completed with a write of `size` bytes at `at` in that word, `Some(None)` when it is not
    /// for this path (the table is to be unprotected), `None` when the instruction is to
    /// run again.
    fn pt_emulate(
        &mut self,
        vmcs: &CurrentVmcs,
        gpa: u64,
        ctx: &PermCtx,
    ) -> Option<Option<(u64, u8)>> {
        use core::sync::atomic::{AtomicU64, Ordering};
        let (code, n) = self.fetch_insn(vmcs, ctx)?;
        let mode = emulate::guest_mode(self, vmcs);
        let Ok(insn) = rvmm_core::emulate::decode(&code[..n], mode.long, mode.def32) else {
            return Some(None);
        };
        if !emulate::pt_emulates(&insn) {
            return Some(None);
        }
        let word_gpa = gpa & !7;
        let Some(p) = self.slots.ptr_mut(word_gpa, 8) else {
            return Some(None);
        };
        // SAFETY: `p` is an 8-byte aligned pointer into a pinned guest page (`ptr_mut`
        // checked the range); the guest and other vCPUs only access it as memory, so
        // atomic accesses through it are sound.
        let word = unsafe { &*p.cast::<AtomicU64>() };
        // Another vCPU changing the word between the read and the compare-exchange
        // makes the instruction run again here, a bounded number of times.
        for _ in 0..8 {
            let before = self.emu_regs(vmcs);
            let mut regs = before;
            let pt = emulate::PtWord {
                word: word_gpa,
                seen: None,
            };
            let mut env = emulate::GuestEnv::new(self, vmcs, ctx, Some(pt));
            let done = match rvmm_core::emulate::execute(&insn, &mode, &mut regs, &mut env) {
                Ok(d) => d,
                Err(rvmm_core::emulate::Stop::Retry) => return None,
                // Faults and the rest: the CPU decides, natively.
                Err(_) => return Some(None),
            };
            let seen = env.pt.as_ref().and_then(|pt| pt.seen);
            let breakpoints = env.breakpoints_hit();
            let Some(w) = env.single_ram_write() else {
                return Some(None);
            };
            if w.gpa & !7 != word_gpa || (w.gpa & 7) + u64::from(w.len) > 8 {
                return Some(None);
            }
            let shift = 8 * (w.gpa & 7);
            let mask = if w.len == 8 {
                u64::MAX
            } else {
                ((1u64 << (8 * u32::from(w.len))) - 1) << shift
            };
            let value = (u64::from_le_bytes(w.data) << shift) & mask;
            let stored = match seen {
                // A read-modify-write: against the word the instruction read.
                Some(old) => word
                    .compare_exchange(
                        old,
                        (old & !mask) | value,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok(),
                // A plain store: its bytes replace theirs, the rest of the word stays.
                // One atomic store of its width when aligned; else one compare-exchange
                // against the word now (and again on a race, a bounded number of times).
                None => match store_exact(p, w.gpa & 7, w.len, u64::from_le_bytes(w.data)) {
                    true => true,
                    false => {
                        let cur = word.load(Ordering::SeqCst);
                        word.compare_exchange(
                            cur,
                            (cur & !mask) | value,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        )
                        .is_ok()
                    }
                },
            };
            if stored {
                self.emu_commit_regs(vmcs, &before, &regs, done);
                emulate::data_breakpoint_trap(vmcs, breakpoints);
                return Some(Some((w.gpa, w.len)));
            }
        }
        Some(None)
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
            let ctx = self.perm_ctx(vmcs);
            let late = self.sync_late();
            let mut done = true;
            // None: no root, or one from an older pool generation.
            let r = match self.shadow.pool.lock().as_deref_mut() {
                Some(storage) => {
                    let mut pool = storage.pool();
                    match self.proot {
                        // Its sync would take a step's work: in the next section (most
                        // INVLPGs have nothing to sync: they go on at once).
                        Some(root)
                            if pool.st.generation == self.proot_gen
                                && late
                                && pool.sync_needed(root, true) =>
                        {
                            return Next::Host;
                        }
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
