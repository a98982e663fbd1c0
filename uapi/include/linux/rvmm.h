/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* Generated from uapi/src/lib.rs by `RVMM_BLESS=1 cargo test -p rvmm-uapi`: do not edit. */
#ifndef _UAPI_LINUX_RVMM_H
#define _UAPI_LINUX_RVMM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define RVMM_IOCTL_TYPE 0xB9
#define RVMM_API_VERSION 1
#define RVMM_NR_EXIT_REASONS 72
#define RVMM_EVENT_INTERRUPT 0
#define RVMM_EVENT_EXCEPTION 1
#define RVMM_CPUID_SIGNIFICANT_INDEX 1
#define RVMM_MAX_CPUID_ENTRIES 64
#define RVMM_MAX_MSR_ENTRIES 16
#define RVMM_MAX_MEMSLOTS 32
#define RVMM_MAX_VCPUS 8
#define RVMM_MEM_READONLY 1
#define RVMM_RUN_MMAP_SIZE 4096
#define RVMM_EXIT_UNKNOWN 0
#define RVMM_EXIT_IO 2
#define RVMM_EXIT_HYPERCALL 3
#define RVMM_EXIT_HLT 5
#define RVMM_EXIT_MMIO 6
#define RVMM_EXIT_IRQ_WINDOW_OPEN 7
#define RVMM_EXIT_SHUTDOWN 8
#define RVMM_EXIT_FAIL_ENTRY 9
#define RVMM_EXIT_INTR 10
#define RVMM_EXIT_INTERNAL_ERROR 17
#define RVMM_EXIT_IO_IN 0
#define RVMM_EXIT_IO_OUT 1
#define RVMM_INTERNAL_UNHANDLED_EXIT 1
#define RVMM_INTERNAL_EMULATION 2
#define RVMM_INTERNAL_NO_SHADOW 3

struct rvmm_vmx_caps {
	__u64 basic;
	__u64 pinbased;
	__u64 procbased;
	__u64 procbased2;
	__u64 exit;
	__u64 entry;
	__u64 misc;
	__u64 ept_vpid_cap;
	__u64 cr0_fixed0;
	__u64 cr0_fixed1;
	__u64 cr4_fixed0;
	__u64 cr4_fixed1;
	__u32 vmcs_revision;
	__u32 vmcs_size;
};

struct rvmm_status {
	__u32 online_cpus;
	__u32 vmx_cpus;
	__u32 vmxe_cpus;
	__u32 vmcs_ok_cpus;
	__u32 shared_cpus;
	__u32 vmcs_ptr_clobbered;
	__u32 foreign_vmcs_cpus;
	__u32 reserved;
};

#define RVMM_GET_API_VERSION _IO(RVMM_IOCTL_TYPE, 0x00)
#define RVMM_GET_VMX_CAPS _IOR(RVMM_IOCTL_TYPE, 0x01, struct rvmm_vmx_caps)
#define RVMM_GET_STATUS _IOR(RVMM_IOCTL_TYPE, 0x02, struct rvmm_status)

#endif /* _UAPI_LINUX_RVMM_H */
