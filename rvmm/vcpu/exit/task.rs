// SPDX-License-Identifier: GPL-2.0

//! Task-switch exits: VMX hands every hardware task switch to the VMM (a CALL, JMP or
//! IRET to another task, an event through a task gate). The emulator's `task_switch`
//! saves the old task and loads the new one; this commits it: TR, LDTR, CR3 (the
//! shadow root), the segments and registers, CR0.TS and DR7's local enables.

use rvmm_core::emulate::{task_switch, Stop, TaskSource};

use super::*;
use crate::vcpu::state::SEGS;

/// Exit qualification bits 31:30: the source of the task switch (SDM Vol. 3C, 28.2.1).
const SOURCE_CALL: u64 = 0;
const SOURCE_IRET: u64 = 1;
const SOURCE_JMP: u64 = 2;
/// DR7's local breakpoint enables (L0-L3) and LE, which a task switch clears.
const DR7_LOCAL: u64 = 0x155;

impl VcpuInner {
    // Out of line: its emulator state stays off the common exit path's stack frame.
    #[cold]
    #[inline(never)]
    pub(super) fn task_switch(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        qual: u64,
    ) -> Next {
        let sel = qual as u16;
        let idt = vmcs.read(ro::IDT_VECTORING_INFO) as u32;
        let event = idt & intr::VALID != 0;
        let source = match qual >> 30 & 3 {
            SOURCE_CALL => TaskSource::Call,
            SOURCE_IRET => TaskSource::Iret,
            SOURCE_JMP => TaskSource::Jmp,
            _ => TaskSource::Gate(
                (event && idt & intr::HAS_ERROR_CODE != 0)
                    .then(|| vmcs.read(ro::IDT_VECTORING_ERR_CODE) as u32),
            ),
        };
        // The old task resumes past the instruction that switched (CALL, JMP, IRET, or
        // INT n/INT3/INTO through a gate), or at the one an event interrupted.
        let software = matches!(
            idt & intr::TYPE_MASK,
            intr::TYPE_SW_INTR | intr::TYPE_SW_EXCEPTION | intr::TYPE_PRIV_SW_EXCEPTION
        );
        let past = !matches!(source, TaskSource::Gate(_)) || (event && software);
        let rip = vmcs.read(guest::RIP);
        let before = self.emu_regs(vmcs);
        let mut regs = before;
        if past {
            regs.rip = self.rip_after(vmcs, rip, vmcs.read(ro::VMEXIT_INSTRUCTION_LEN));
        }
        let mode = guest_mode(self, vmcs);
        let ctx = self.perm_ctx(vmcs);
        let mut env = GuestEnv::<
            { super::emulate::TASK_SWITCH_WRITES },
            { super::emulate::TASK_SWITCH_SEG_LOADS },
        >::with_writes(self, vmcs, &ctx, None);
        let r = task_switch(sel, source, &mode, &mut regs, &mut env);
        let fx = env.effects();
        // A TSS or descriptor table in device memory: not emulated (its reads would
        // have to go to userspace in the middle of the switch).
        let r = match r {
            Err(Stop::Retry) if fx.need.is_some() => Err(Stop::Unsupported(0x0f_0009)),
            Ok(_) if fx.device_writes() => Err(Stop::Unsupported(0x0f_0009)),
            r => r,
        };
        let load = match r {
            Ok(load) => load,
            Err(Stop::Exception(e)) => return self.emu_exception(vmcs, e),
            // The page tables changed under a walk: the switch happens again.
            Err(Stop::Retry) => {
                Self::requeue_event(vmcs, idt);
                return Next::Fast;
            }
            Err(Stop::Unsupported(op)) => {
                Self::requeue_event(vmcs, idt);
                return self.internal_error(
                    run,
                    uapi::RVMM_INTERNAL_EMULATION,
                    [u64::from(op), rip, qual, 10],
                );
            }
        };
        // CR3 first: with paging on, the new task's root (which may take steps; the
        // switch then happens again).
        if self.cr0 & CR0_PG != 0 {
            if let Err(n) = self.write_cr(vmcs, run, 3, load.cr3) {
                // A #GP (bad PDPTEs) is what the guest gets; otherwise the switch (and
                // its event) happens again.
                if vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 & intr::VALID == 0 {
                    Self::requeue_event(vmcs, idt);
                }
                return n;
            }
        } else {
            self.cr3 = load.cr3;
        }
        let full = self.apply_effects(vmcs, &ctx, &fx);
        for (i, seg) in [(6, load.tr), (7, load.ldtr)] {
            let (s, b, l, a) = SEGS[i];
            vmcs.write(s, seg.selector.into());
            vmcs.write(b, seg.base);
            vmcs.write(l, seg.limit.into());
            vmcs.write(a, seg.ar.into());
        }
        self.emu_commit_regs(vmcs, &before, &regs, rvmm_core::emulate::Done::Repeat);
        vmcs.write(guest::RIP, regs.rip);
        let mut istate = vmcs.read(guest::INTERRUPTIBILITY_STATE) & !3;
        if event && idt & intr::TYPE_MASK == intr::TYPE_NMI {
            istate |= 8;
        }
        vmcs.write(guest::INTERRUPTIBILITY_STATE, istate);
        // CR0.TS set (nothing of paging changes), DR7's local enables cleared.
        let need_reset = self.need_reset;
        self.cr0 |= CR0_TS;
        self.apply_paging_state(vmcs);
        self.need_reset = need_reset;
        let dr7 = vmcs.read(guest::DR7) & !DR7_LOCAL;
        vmcs.write(guest::DR7, dr7);
        self.dr[7] = dr7;
        self.state_checked = false;
        if full && !self.reload_root(vmcs, true) {
            return self.no_shadow(vmcs, run, rip, 10);
        }
        Next::Fast
    }
}
