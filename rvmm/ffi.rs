// SPDX-License-Identifier: GPL-2.0

//! The C helper's functions (rvmm/helpers.c, declared for C in rvmm/helpers.h): what
//! the 7.3 kernel crate has no abstraction for yet.

use core::ffi::c_void;

extern "C" {
    pub(crate) fn rvmm_vmx_enable_all() -> i32;
    pub(crate) fn rvmm_vmx_disable_all();
    pub(crate) fn rvmm_vmx_held_here() -> bool;
    pub(crate) fn rvmm_vmx_shared_here() -> bool;
    pub(crate) fn rvmm_cr4_vmxe_here() -> bool;
    pub(crate) fn rvmm_rdmsr_safe(msr: u32, val: *mut u64) -> i32;
    pub(crate) fn rvmm_on_each_online_cpu(
        f: unsafe extern "C" fn(*mut c_void),
        info: *mut c_void,
    ) -> u32;
    pub(crate) fn rvmm_page_to_phys(page: *mut c_void) -> u64;
    pub(crate) fn rvmm_pin_user_pages(
        uaddr: usize,
        nr: usize,
        write: bool,
        pages: *mut *mut c_void,
    ) -> isize;
    pub(crate) fn rvmm_unpin_user_pages(pages: *mut *mut c_void, nr: usize, dirty: bool);
    pub(crate) fn rvmm_account_pinned(nr: usize, err: *mut i32) -> *mut c_void;
    pub(crate) fn rvmm_unaccount_pinned(user: *mut c_void, nr: usize);
    pub(crate) fn rvmm_pa_to_va(pa: u64) -> *mut c_void;
    pub(crate) fn rvmm_fpu_begin();
    pub(crate) fn rvmm_fpu_end();
    pub(crate) fn rvmm_irq_save() -> usize;
    pub(crate) fn rvmm_irq_restore(flags: usize);
    pub(crate) fn rvmm_after_vmexit();
    pub(crate) fn rvmm_task_has_io_bitmap() -> bool;
    pub(crate) fn rvmm_reraise_nmi();
    pub(crate) fn rvmm_machine_check();
    fn rvmm_ratelimit() -> bool;
    pub(crate) fn rvmm_spec_init(force: bool);
    pub(crate) fn rvmm_spec_l1d_flush();
    pub(crate) fn rvmm_cpu_has_l1tf() -> bool;
    pub(crate) fn rvmm_signal_pending() -> bool;
    pub(crate) fn rvmm_exit_request() -> bool;
    pub(crate) fn rvmm_cond_resched();
    pub(crate) fn rvmm_read_cr3() -> u64;
    pub(crate) fn rvmm_cpu() -> i32;
    pub(crate) fn rvmm_kick_cpu(cpu: i32);
    pub(crate) fn rvmm_tsc_khz() -> u32;
    pub(crate) fn cr4_read_shadow() -> usize;
    pub(crate) fn rvmm_alloc_page_dma32() -> *mut c_void;
    pub(crate) fn rvmm_free_page(page: *mut c_void);
    pub(crate) fn rvmm_waiter_new() -> *mut c_void;
    pub(crate) fn rvmm_waiter_free(w: *mut c_void);
    pub(crate) fn rvmm_waiter_arm(w: *mut c_void);
    pub(crate) fn rvmm_waiter_sleep(w: *mut c_void, timeout_ns: i64) -> i32;
    pub(crate) fn rvmm_waiter_wake(w: *mut c_void);
}

/// Whether a log line a user can cause may be printed now (see `user_pr!`).
pub(crate) fn log_allowed() -> bool {
    // SAFETY: the kernel's ratelimit state, callable from any context.
    unsafe { rvmm_ratelimit() }
}
