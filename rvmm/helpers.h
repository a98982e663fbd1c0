/* SPDX-License-Identifier: GPL-2.0 */
/* The C helper's interface; rvmm/vmx.rs declares the same functions for Rust. */
#ifndef RVMM_HELPERS_H
#define RVMM_HELPERS_H

#include <linux/types.h>

struct page;

int rvmm_vmx_enable_all(void);
void rvmm_vmx_disable_all(void);
bool rvmm_vmx_held_here(void);
bool rvmm_vmx_shared_here(void);
bool rvmm_cr4_vmxe_here(void);
int rvmm_rdmsr_safe(u32 msr, u64 *val);
unsigned int rvmm_on_each_online_cpu(void (*fn)(void *), void *info);
u64 rvmm_page_to_phys(struct page *page);



long rvmm_pin_user_pages(unsigned long uaddr, unsigned long nr, bool write, struct page **pages);
void rvmm_unpin_user_pages(struct page **pages, unsigned long nr, bool dirty);
struct user_struct;
struct user_struct *rvmm_account_pinned(unsigned long nr, int *err);
void rvmm_unaccount_pinned(struct user_struct *user, unsigned long nr);
void *rvmm_pa_to_va(u64 pa);
void rvmm_fpu_begin(void);
void rvmm_fpu_end(void);
unsigned long rvmm_irq_save(void);
void rvmm_irq_restore(unsigned long flags);
void rvmm_after_vmexit(void);
void rvmm_reraise_nmi(void);
void rvmm_machine_check(void);
bool rvmm_ratelimit(void);
void rvmm_spec_init(bool force);
void rvmm_spec_l1d_flush(void);
bool rvmm_cpu_has_l1tf(void);
bool rvmm_signal_pending(void);
bool rvmm_exit_request(void);
void rvmm_cond_resched(void);
u64 rvmm_read_cr3(void);
int rvmm_cpu(void);
void rvmm_kick_cpu(int cpu);
struct page *rvmm_alloc_page_dma32(void);
void rvmm_free_page(struct page *page);
bool rvmm_task_has_io_bitmap(void);
unsigned int rvmm_tsc_khz(void);
struct rvmm_waiter;
struct rvmm_waiter *rvmm_waiter_new(void);
void rvmm_waiter_free(struct rvmm_waiter *w);
void rvmm_waiter_arm(struct rvmm_waiter *w);
int rvmm_waiter_sleep(struct rvmm_waiter *w, s64 timeout_ns);
void rvmm_waiter_wake(struct rvmm_waiter *w);
#endif
