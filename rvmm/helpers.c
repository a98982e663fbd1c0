// SPDX-License-Identifier: GPL-2.0
/*
 * rvmm's C helper: only what the 7.3 kernel crate has no Rust abstraction for.
 *
 * - The kernel's refcounted VMX enable (x86_virt_get_ref/put_ref, exported to rvmm by
 *   kernel/patches/0001-*.patch), taken on every online CPU through a CPU hotplug state
 *   and dropped on unload, on CPU offline and at shutdown/reboot/kexec (syscore).
 * - rdmsr_safe, the CR4 register and shadow, on_each_cpu, __pa.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cpu.h>
#include <linux/cpuhotplug.h>
#include <linux/cred.h>
#include <linux/kvm_types.h>
#include <linux/mm.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sched/user.h>
#include <linux/percpu.h>
#include <linux/ratelimit.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/wait.h>
#include <trace/events/ipi.h>
#include <linux/syscore_ops.h>
#include <asm/apic.h>
#include <asm/desc.h>
#include <asm/fpu/api.h>
#include <asm/mce.h>
#include <asm/msr.h>
#include <asm/cpufeature.h>
#include <asm/segment.h>
#include <asm/special_insns.h>
#include <asm/tsc.h>
#include <asm/tlbflush.h>
#include <asm/virt.h>

#include "helpers.h"

/* Per CPU: does rvmm hold a VMX reference here, and was VMX on already when it took it? */
static DEFINE_PER_CPU(bool, rvmm_vmx_held);
static DEFINE_PER_CPU(bool, rvmm_vmx_shared);
static enum cpuhp_state rvmm_cpuhp_state;
static bool rvmm_shutting_down;

static int rvmm_cpu_online(unsigned int cpu)
{
	unsigned long flags;
	int r = 0;

	local_irq_save(flags);
	if (!this_cpu_read(rvmm_vmx_held) && !READ_ONCE(rvmm_shutting_down)) {
		this_cpu_write(rvmm_vmx_shared, !!(cr4_read_shadow() & X86_CR4_VMXE));
		r = x86_virt_get_ref(X86_FEATURE_VMX);
		if (!r)
			this_cpu_write(rvmm_vmx_held, true);
	}
	local_irq_restore(flags);
	if (r)
		pr_err("enabling VMX on CPU %u failed (%d): %s\n", cpu, r,
		       r == -EOPNOTSUPP ? "the kernel has no VMX support set up (CONFIG_KVM_INTEL=n or VMX cleared at boot)" :
		       r == -EBUSY ? "CR4.VMXE is already set by a user outside the kernel's refcount" :
		       "VMXON failed");
	return r;
}

static int rvmm_cpu_offline(unsigned int cpu)
{
	unsigned long flags;

	local_irq_save(flags);
	if (this_cpu_read(rvmm_vmx_held)) {
		this_cpu_write(rvmm_vmx_held, false);
		x86_virt_put_ref(X86_FEATURE_VMX);
	}
	local_irq_restore(flags);
	return 0;
}

static void rvmm_shutdown_cpu(void *unused)
{
	rvmm_cpu_offline(smp_processor_id());
}

/* VMX blocks INIT: leave VMX operation on every CPU before reboot, power-off, kexec. */
static void rvmm_shutdown(void *data)
{
	pr_info("leaving VMX operation on all CPUs for shutdown/reboot/kexec\n");
	WRITE_ONCE(rvmm_shutting_down, true);
	on_each_cpu(rvmm_shutdown_cpu, NULL, 1);
}

static const struct syscore_ops rvmm_syscore_ops = {
	.shutdown = rvmm_shutdown,
};

static struct syscore rvmm_syscore = {
	.ops = &rvmm_syscore_ops,
};

/* Returns 0 or a negative errno; on error nothing is held. */
int rvmm_vmx_enable_all(void)
{
	int r;

	r = cpuhp_setup_state(CPUHP_AP_ONLINE_DYN, "rvmm/vmx:online", rvmm_cpu_online,
			      rvmm_cpu_offline);
	if (r < 0)
		return r;
	rvmm_cpuhp_state = r;
	register_syscore(&rvmm_syscore);
	return 0;
}

void rvmm_vmx_disable_all(void)
{
	unregister_syscore(&rvmm_syscore);
	cpuhp_remove_state(rvmm_cpuhp_state);
}

bool rvmm_vmx_held_here(void)
{
	return this_cpu_read(rvmm_vmx_held);
}

bool rvmm_vmx_shared_here(void)
{
	return this_cpu_read(rvmm_vmx_shared);
}

/* CR4.VMXE in the register and in the kernel's shadow, on this CPU. */
bool rvmm_cr4_vmxe_here(void)
{
	return (__read_cr4() & X86_CR4_VMXE) && (cr4_read_shadow() & X86_CR4_VMXE);
}

int rvmm_rdmsr_safe(u32 msr, u64 *val)
{
	return rdmsrq_safe(msr, val);
}

/* Runs fn on every online CPU (IRQs off), with hotplug held off. Returns the CPU count. */
unsigned int rvmm_on_each_online_cpu(void (*fn)(void *), void *info)
{
	unsigned int n;

	cpus_read_lock();
	on_each_cpu(fn, info, 1);
	n = num_online_cpus();
	cpus_read_unlock();
	return n;
}

u64 rvmm_page_to_phys(struct page *page)
{
	return page_to_phys(page);
}

/* ---- guest memory: long-term pins of the VMM's pages ---------------------------- */

/* Pins nr pages at uaddr for writing (or reading); returns pages pinned or -errno. */
long rvmm_pin_user_pages(unsigned long uaddr, unsigned long nr, bool write, struct page **pages)
{
	unsigned int gup = FOLL_LONGTERM | (write ? FOLL_WRITE : 0);
	long done = 0;

	while (done < nr) {
		int n = pin_user_pages_fast(uaddr + done * PAGE_SIZE, min_t(unsigned long, nr - done, 512),
					    gup, pages + done);
		if (n <= 0) {
			if (done)
				unpin_user_pages(pages, done);
			return n < 0 ? n : -EFAULT;
		}
		done += n;
		cond_resched();
	}
	return done;
}

void rvmm_unpin_user_pages(struct page **pages, unsigned long nr, bool dirty)
{
	unpin_user_pages_dirty_lock(pages, nr, dirty);
}

/*
 * Long-term pins count against RLIMIT_MEMLOCK (without CAP_IPC_LOCK), charged to the
 * user, as io_uring's registered buffers are: a process cannot escape the limit by
 * forking or exec'ing (an mm's count starts again at 0 in both, while VM file
 * descriptors live on). Returns the user charged, with a reference to uncharge it
 * later from any task, or NULL with *err set (-ENOMEM: over the limit).
 */
#if !(defined(CONFIG_NET) || defined(CONFIG_IO_URING) || \
	defined(CONFIG_VFIO_PCI_ZDEV_KVM) || IS_ENABLED(CONFIG_IOMMUFD) || \
	defined(CONFIG_SECRETMEM))
#error "rvmm charges pinned memory to user_struct.locked_vm: enable CONFIG_NET (or IO_URING, IOMMUFD, SECRETMEM)"
#endif

struct user_struct *rvmm_account_pinned(unsigned long nr, int *err)
{
	struct user_struct *user = current_user();
	unsigned long limit = rlimit(RLIMIT_MEMLOCK) >> PAGE_SHIFT;
	unsigned long cur, new;

	cur = atomic_long_read(&user->locked_vm);
	do {
		if (check_add_overflow(cur, nr, &new) ||
		    (new > limit && !capable(CAP_IPC_LOCK))) {
			*err = -ENOMEM;
			return NULL;
		}
	} while (!atomic_long_try_cmpxchg(&user->locked_vm, &cur, new));
	*err = 0;
	return get_uid(user);
}

void rvmm_unaccount_pinned(struct user_struct *user, unsigned long nr)
{
	atomic_long_sub(nr, &user->locked_vm);
	free_uid(user);
}

void *rvmm_pa_to_va(u64 pa)
{
	return __va(pa);
}

/* ---- speculative-execution barriers around the guest ---------------------------------- */

/*
 * Read by the entry/exit stub (rvmm/vmx.rs) and the run loop: set once at load from the
 * kernel's own mitigation choices (the feature bits its bugs.c sets for KVM's guests),
 * or all on with the module parameter spec_force (for testing them where the CPU needs
 * none).
 */
u8 rvmm_spec_verw;		/* VERW before VM entry (MDS, MMIO stale data) */
u16 rvmm_spec_verw_sel = __KERNEL_DS;
u8 rvmm_spec_rsb;		/* after VM exit: 1 fill the RSB, 2 one CALL (PBRSB) */
u8 rvmm_spec_bhb;		/* after VM exit: clear branch history (BHI, clear_bhb_loop) */
static bool rvmm_spec_l1d;	/* L1D flush before a run section's first entry (L1TF) */

void rvmm_spec_init(bool force)
{
	rvmm_spec_verw = force || cpu_feature_enabled(X86_FEATURE_CLEAR_CPU_BUF_VM);
	if (force || cpu_feature_enabled(X86_FEATURE_RSB_VMEXIT))
		rvmm_spec_rsb = 1;
	else if (cpu_feature_enabled(X86_FEATURE_RSB_VMEXIT_LITE))
		rvmm_spec_rsb = 2;
	else
		rvmm_spec_rsb = 0;
	rvmm_spec_bhb = force || cpu_feature_enabled(X86_FEATURE_CLEAR_BHB_VMEXIT);
	rvmm_spec_l1d = boot_cpu_has(X86_FEATURE_FLUSH_L1D) &&
			(force || boot_cpu_has_bug(X86_BUG_L1TF));
	pr_info("speculation barriers: VERW before entry %s, RSB after exit %s, branch history after exit %s, L1D flush %s, MMIO shadow entries %s\n",
		rvmm_spec_verw ? "on" : "off",
		rvmm_spec_rsb == 1 ? "fill" : rvmm_spec_rsb == 2 ? "one call" : "off",
		rvmm_spec_bhb ? "cleared" : "kept",
		rvmm_spec_l1d ? "per run section" : "off",
		boot_cpu_has_bug(X86_BUG_L1TF) ? "off (L1TF)" : "on");
}

bool rvmm_cpu_has_l1tf(void)
{
	return boot_cpu_has_bug(X86_BUG_L1TF);
}

/* Before the first VM entry of a run section: host code ran since the last one. */
void rvmm_spec_l1d_flush(void)
{
	if (rvmm_spec_l1d)
		wrmsrq(MSR_IA32_FLUSH_CMD, L1D_FLUSH);
}

/* ---- the run loop's host context ---------------------------------------------------- */

void rvmm_fpu_begin(void)
{
	kernel_fpu_begin();
}

void rvmm_fpu_end(void)
{
	kernel_fpu_end();
}

unsigned long rvmm_irq_save(void)
{
	unsigned long flags;

	local_irq_save(flags);
	return flags;
}

void rvmm_irq_restore(unsigned long flags)
{
	local_irq_restore(flags);
}

/*
 * After a VM exit TR's limit is 0x67, which cuts off the TSS I/O bitmap: mark it for
 * the kernel to reload when a task that uses ioperm() runs on this CPU. (The kernel's
 * own immediate reload needs load_direct_gdt, which it exports to KVM only; rvmm
 * refuses to run vCPUs from a task that has an I/O bitmap itself.)
 */
void rvmm_after_vmexit(void)
{
	this_cpu_write(__tss_limit_invalid, true);
}

bool rvmm_task_has_io_bitmap(void)
{
	return test_thread_flag(TIF_IO_BITMAP);
}

/* An NMI that arrived in the guest caused the exit: hand it to the host. */
void rvmm_reraise_nmi(void)
{
	apic->send_IPI_self(NMI_VECTOR);
}

/*
 * A machine check hit the guest (or its VM entry): the host's handler runs it, as if it
 * had hit the host. Without CONFIG_X86_MCE the host ignores machine checks as well.
 */
void rvmm_machine_check(void)
{
#if IS_ENABLED(CONFIG_X86_MCE)
	struct pt_regs regs = {
		.cs = 3, /* as if from user mode: the handler may kill the task, not panic */
		.flags = X86_EFLAGS_IF,
	};

	do_machine_check(&regs);
#endif
}

/* Log lines a user can cause: the kernel's default burst of 10 every 5 s, module-wide. */
static DEFINE_RATELIMIT_STATE(rvmm_user_rs, DEFAULT_RATELIMIT_INTERVAL, DEFAULT_RATELIMIT_BURST);

bool rvmm_ratelimit(void)
{
	return __ratelimit(&rvmm_user_rs);
}

bool rvmm_signal_pending(void)
{
	return signal_pending(current);
}

/* The host wants the CPU back, or the task has a signal: leave the run section. */
bool rvmm_exit_request(void)
{
	return need_resched() || signal_pending(current);
}

void rvmm_cond_resched(void)
{
	cond_resched();
}

u64 rvmm_read_cr3(void)
{
	return __read_cr3();
}

int rvmm_cpu(void)
{
	return smp_processor_id();
}

/* Makes `cpu` take an interrupt, so a vCPU running there leaves guest mode (KVM's kick). */
void rvmm_kick_cpu(int cpu)
{
	/* A vCPU's section may have ended and its CPU gone offline since it was seen. */
	if (cpu_online(cpu))
		smp_send_reschedule(cpu);
}

/* A zeroed page below 4 GiB (a PAE shadow root must be: CR3 is 32 bits there). */
struct page *rvmm_alloc_page_dma32(void)
{
	return alloc_page(GFP_KERNEL_ACCOUNT | __GFP_RETRY_MAYFAIL | __GFP_NOWARN | __GFP_ZERO | GFP_DMA32);
}

void rvmm_free_page(struct page *page)
{
	__free_page(page);
}

unsigned int rvmm_tsc_khz(void)
{
	return tsc_khz;
}

/*
 * A halted vCPU's sleep: the kernel crate's CondVar waits in jiffies; an APIC timer
 * needs an hrtimer's precision (wait_event_interruptible_hrtimeout).
 */
struct rvmm_waiter {
	wait_queue_head_t wq;
	atomic_t woken;
};

struct rvmm_waiter *rvmm_waiter_new(void)
{
	struct rvmm_waiter *w = kzalloc(sizeof(*w), GFP_KERNEL_ACCOUNT | __GFP_RETRY_MAYFAIL | __GFP_NOWARN);

	if (w)
		init_waitqueue_head(&w->wq);
	return w;
}

void rvmm_waiter_free(struct rvmm_waiter *w)
{
	kfree(w);
}

/* Forget earlier wake-ups: the caller checks for work after this, then sleeps. */
void rvmm_waiter_arm(struct rvmm_waiter *w)
{
	atomic_set(&w->woken, 0);
	smp_mb__after_atomic();
}

/*
 * Sleeps until rvmm_waiter_wake, a signal, or timeout_ns (< 0: no timeout) passed.
 * Returns 0 when woken or timed out, -ERESTARTSYS on a signal.
 */
int rvmm_waiter_sleep(struct rvmm_waiter *w, s64 timeout_ns)
{
	long r;

	if (timeout_ns < 0)
		r = wait_event_interruptible(w->wq, atomic_read(&w->woken));
	else
		r = wait_event_interruptible_hrtimeout(w->wq, atomic_read(&w->woken),
						       ns_to_ktime(timeout_ns));
	return r == -ERESTARTSYS ? r : 0;
}

/* Callable from any context, interrupts off included. */
void rvmm_waiter_wake(struct rvmm_waiter *w)
{
	atomic_set(&w->woken, 1);
	smp_mb__after_atomic();
	wake_up_interruptible(&w->wq);
}
