/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* Generated from uapi/src/lib.rs by `RVMM_BLESS=1 cargo test -p rvmm-uapi`: do not edit. */
#ifndef _UAPI_LINUX_RVMM_H
#define _UAPI_LINUX_RVMM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define RVMM_IOCTL_TYPE 0xB9
#define RVMM_API_VERSION 3
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
#define RVMM_MP_STATE_RUNNABLE 0
#define RVMM_MP_STATE_WAIT_SIPI 1
#define RVMM_HC_ENOSYS 18446744073709550616
#define RVMM_HC_EPERM 18446744073709551615

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

struct rvmm_msi {
	__u64 address;
	__u32 data;
	__u32 flags;
};

struct rvmm_mp_state {
	__u32 vcpu;
	__u32 state;
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

struct rvmm_memory_region {
	__u32 slot;
	__u32 flags;
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;
};

struct rvmm_regs {
	__u64 rax;
	__u64 rbx;
	__u64 rcx;
	__u64 rdx;
	__u64 rsi;
	__u64 rdi;
	__u64 rsp;
	__u64 rbp;
	__u64 r8;
	__u64 r9;
	__u64 r10;
	__u64 r11;
	__u64 r12;
	__u64 r13;
	__u64 r14;
	__u64 r15;
	__u64 rip;
	__u64 rflags;
};

struct rvmm_segment {
	__u64 base;
	__u32 limit;
	__u16 selector;
	__u8 seg_type;
	__u8 present;
	__u8 dpl;
	__u8 db;
	__u8 s;
	__u8 l;
	__u8 g;
	__u8 avl;
	__u8 unusable;
	__u8 padding;
};

struct rvmm_dtable {
	__u64 base;
	__u16 limit;
	__u16 padding[3];
};

struct rvmm_sregs {
	struct rvmm_segment cs;
	struct rvmm_segment ds;
	struct rvmm_segment es;
	struct rvmm_segment fs;
	struct rvmm_segment gs;
	struct rvmm_segment ss;
	struct rvmm_segment tr;
	struct rvmm_segment ldt;
	struct rvmm_dtable gdt;
	struct rvmm_dtable idt;
	__u64 cr0;
	__u64 cr2;
	__u64 cr3;
	__u64 cr4;
	__u64 cr8;
	__u64 efer;
	__u64 apic_base;
};

struct rvmm_vcpu_regs {
	__u32 vcpu;
	__u32 padding;
	struct rvmm_regs regs;
};

struct rvmm_vcpu_sregs {
	__u32 vcpu;
	__u32 padding;
	struct rvmm_sregs sregs;
};

struct rvmm_exit_io {
	__u8 direction;
	__u8 size;
	__u16 port;
	__u32 count;
	__u64 data_offset;
};

struct rvmm_exit_mmio {
	__u64 phys_addr;
	__u8 data[8];
	__u32 len;
	__u8 is_write;
	__u8 padding[3];
};

struct rvmm_exit_hypercall {
	__u64 nr;
	__u64 args[6];
	__u64 ret;
};

struct rvmm_exit_fail_entry {
	__u64 hardware_entry_failure_reason;
	__u32 cpu;
	__u32 vmfail;
};

struct rvmm_exit_internal {
	__u32 suberror;
	__u32 ndata;
	__u64 data[4];
};

struct rvmm_run {
	__u8 request_interrupt_window;
	__u8 immediate_exit;
	__u8 ready_for_interrupt_injection;
	__u8 if_flag;
	__u32 exit_reason;
	struct rvmm_exit_io io;
	struct rvmm_exit_mmio mmio;
	struct rvmm_exit_hypercall hypercall;
	struct rvmm_exit_fail_entry fail_entry;
	struct rvmm_exit_internal internal;
	__u64 io_data[32];
};

struct rvmm_vm_stats {
	__u64 exits[72];
	__u64 shadow_faults;
	__u64 guest_page_faults;
	__u64 shadow_resets;
	__u64 user_exits;
	__u64 mmio_exits;
	__u64 pt_writes;
	__u64 unsyncs;
	__u64 resyncs;
	__u64 flood_unshadows;
	__u64 prefetched;
	__u64 pool_pages_in_use;
	__u64 pool_pages_peak;
	__u64 pool_reclaimed;
	__u64 root_hits;
	__u64 root_misses;
	__u64 zaps;
	__u64 pool_resets;
	__u64 mmio_fast;
	__u64 pt_emulated;
	__u64 apic_injections;
	__u64 apic_timer_irqs;
	__u64 apic_messages;
	__u64 halt_sleeps;
	__u64 apic_accesses;
	__u64 longest_section_ns;
	__u64 real_mode_emulated;
	__u64 sync_cr3;
	__u64 sync_invlpg;
	__u64 sync_link;
	__u64 sync_flush_all;
	__u64 sync_scanned;
	__u64 resync_entries;
	__u64 resync_changed;
	__u64 faults_direct;
	__u64 remote_flushes;
	__u64 flush_ipis;
	__u64 flush_wait_ns;
	__u64 irq_kicks;
	__u64 unsyncs_upper;
};

struct rvmm_shadow_limits {
	__u32 pages;
	__u32 roots;
};

struct rvmm_hypercall_exits {
	__u64 mask;
};

struct rvmm_interrupt {
	__u32 vcpu;
	__u32 kind;
	__u32 vector;
	__u32 has_error_code;
	__u32 error_code;
	__u32 padding;
};

struct rvmm_cpuid_entry {
	__u32 function;
	__u32 index;
	__u32 flags;
	__u32 eax;
	__u32 ebx;
	__u32 ecx;
	__u32 edx;
	__u32 padding;
};

struct rvmm_cpuid {
	__u32 vcpu;
	__u32 nent;
	struct rvmm_cpuid_entry entries[64];
};

struct rvmm_msr_entry {
	__u32 index;
	__u32 reserved;
	__u64 data;
};

struct rvmm_msrs {
	__u32 vcpu;
	__u32 nmsrs;
	struct rvmm_msr_entry entries[16];
};

#define RVMM_GET_API_VERSION _IO(RVMM_IOCTL_TYPE, 0x00)
#define RVMM_GET_VMX_CAPS _IOR(RVMM_IOCTL_TYPE, 0x01, struct rvmm_vmx_caps)
#define RVMM_GET_STATUS _IOR(RVMM_IOCTL_TYPE, 0x02, struct rvmm_status)
#define RVMM_CREATE_VM _IO(RVMM_IOCTL_TYPE, 0x10)
#define RVMM_SET_MEMORY_REGION _IOW(RVMM_IOCTL_TYPE, 0x11, struct rvmm_memory_region)
#define RVMM_CREATE_VCPU _IO(RVMM_IOCTL_TYPE, 0x12)
#define RVMM_GET_REGS _IOWR(RVMM_IOCTL_TYPE, 0x13, struct rvmm_vcpu_regs)
#define RVMM_SET_REGS _IOW(RVMM_IOCTL_TYPE, 0x14, struct rvmm_vcpu_regs)
#define RVMM_GET_SREGS _IOWR(RVMM_IOCTL_TYPE, 0x15, struct rvmm_vcpu_sregs)
#define RVMM_SET_SREGS _IOW(RVMM_IOCTL_TYPE, 0x16, struct rvmm_vcpu_sregs)
#define RVMM_RUN _IO(RVMM_IOCTL_TYPE, 0x17)
#define RVMM_GET_STATS _IOR(RVMM_IOCTL_TYPE, 0x18, struct rvmm_vm_stats)
#define RVMM_INTERRUPT _IOW(RVMM_IOCTL_TYPE, 0x19, struct rvmm_interrupt)
#define RVMM_SET_CPUID _IOW(RVMM_IOCTL_TYPE, 0x1a, struct rvmm_cpuid)
#define RVMM_GET_MSRS _IOWR(RVMM_IOCTL_TYPE, 0x1b, struct rvmm_msrs)
#define RVMM_SET_MSRS _IOW(RVMM_IOCTL_TYPE, 0x1c, struct rvmm_msrs)
#define RVMM_SET_SHADOW_LIMITS _IOW(RVMM_IOCTL_TYPE, 0x1d, struct rvmm_shadow_limits)
#define RVMM_CREATE_IRQCHIP _IO(RVMM_IOCTL_TYPE, 0x1e)
#define RVMM_SIGNAL_MSI _IOW(RVMM_IOCTL_TYPE, 0x1f, struct rvmm_msi)
#define RVMM_SET_MP_STATE _IOW(RVMM_IOCTL_TYPE, 0x20, struct rvmm_mp_state)
#define RVMM_SET_HYPERCALL_EXITS _IOW(RVMM_IOCTL_TYPE, 0x21, struct rvmm_hypercall_exits)

#endif /* _UAPI_LINUX_RVMM_H */
