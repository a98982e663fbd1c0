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

#endif
