/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The local APIC, as a guest sees it (a flat binary at 0x100000; long mode with the
 * identity map; RDI = vCPU index, RSI = number of vCPUs). vCPU 0 runs every check
 * twice, in xAPIC mode (the MMIO page at 0xfee00000) and in x2APIC mode (MSRs):
 *   id/version; periodic timer rate (28 periods timed with RDTSC, half within 5 %); one-shot timer
 *   (fires once, after the programmed time); TSC-deadline timer; self-IPIs and EOI
 *   (EOI ends the highest in-service vector; nested delivery by priority class); TPR
 *   (and CR8) mask lower classes; x2APIC #GP for an absent register.
 * With 2 vCPUs, in xAPIC mode: a fixed IPI to vCPU 1 by physical and by logical
 * (flat) destination, answered by an IPI back. Then an OUT to port 0xf5 asks the host
 * for an MSI with vector 0xd0 (RVMM_SIGNAL_MSI), which must arrive.
 * Timer rates are expected from CPUID 0x15 (TSC/crystal ratio) and must be within 5 %.
 * Each check prints a line; vCPU 0 ends with OUT 0xf4 = 0x2a if all passed, 0x01 if
 * not. vCPU 1 ends with HLT (interrupts off).
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set DATA, 0x300000
	.set X2, DATA + 0
	.set NOEOI, DATA + 1
	.set GPF, DATA + 2
	.set READY, DATA + 4
	.set LOGN, DATA + 8
	.set FAILS, DATA + 0xc
	.set NMI_COUNT, DATA + 0x10
	.set NMI_NESTED, DATA + 0x14
	.set NMI_DEPTH, DATA + 0x18
	.set RATIO_N, DATA + 0x20
	.set RATIO_D, DATA + 0x28
	.set LOG, DATA + 0x40
	.set COUNT, DATA + 0x100
	.set LAST_TSC, DATA + 0x800
	.set TS, DATA + 0x1000
	.set IDT, DATA + 0x2000
	.set APIC, 0xfee00000
	.set TIMER_VEC, 0x40
	.set DL_VEC, 0x42
	.set IPI_TO_AP, 0xe0
	.set IPI_TO_BSP, 0xe1
	.set MSI_VEC, 0xd0

/* Waits with interrupts off until COUNT[vec] >= n: an interrupt is taken only in the
 * STI shadow's HLT, so none slips in between the check and the HLT. Ends with IF=0. */
.macro WAIT vec, n
	cli
.Lw\@:	cmp	dword ptr [COUNT + \vec * 4], \n
	jae	.Ld\@
	sti
	hlt
	cli
	jmp	.Lw\@
.Ld\@:
.endm

_start:
	mov	r15, rdi
	mov	r14, rsi
	call	setup_idt
	test	r15, r15
	jnz	ap

	/* CPUID: APIC, x2APIC, TSC deadline; leaf 0x15 for the timer's clock. */
	mov	eax, 1
	cpuid
	lea	rsi, [rip + s_cpuid]
	bt	edx, 9
	jnc	fail_line
	bt	ecx, 21
	jnc	fail_line
	bt	ecx, 24
	jnc	fail_line
	mov	eax, 0x15
	cpuid
	test	eax, eax
	jz	fail_line
	test	ebx, ebx
	jz	fail_line
	mov	[RATIO_N], rbx
	mov	[RATIO_D], rax
	call	ok_line

	mov	byte ptr [X2], 0
	lea	rsi, [rip + s_xapic]
	call	puts
	call	checks

	/* Two vCPUs: IPIs both ways, by physical and by logical destination. */
	cmp	r14, 2
	jb	1f
	call	ipi_checks
1:
	/* An MSI from the host (the harness answers OUT 0xf5 with RVMM_SIGNAL_MSI). */
	lea	rsi, [rip + s_msi]
	mov	al, 1
	out	0xf5, al
	WAIT	MSI_VEC, 1
3:	call	ok_line

	/* x2APIC mode. */
	mov	ecx, 0x1b
	rdmsr
	or	eax, 0xc00
	wrmsr
	mov	byte ptr [X2], 1
	lea	rsi, [rip + s_x2apic]
	call	puts
	call	checks
	/* An absent x2APIC register (DFR, 0x80e) is #GP. */
	lea	rsi, [rip + s_gp]
	mov	byte ptr [GPF], 0
	mov	ecx, 0x80e
	rdmsr
	cmp	byte ptr [GPF], 1
	jne	fail_line
	call	ok_line

	cmp	dword ptr [FAILS], 0
	jne	1f
	lea	rsi, [rip + s_allok]
	call	puts
	mov	al, 0x2a
	out	0xf4, al
	hlt
1:	lea	rsi, [rip + s_failed]
	call	puts
	mov	al, 0x01
	out	0xf4, al
	hlt

/* The checks that run in each mode (vCPU 0). */
checks:
	/* Software-enable, spurious vector 0xff. */
	mov	ecx, 0xf0
	mov	eax, 0x1ff
	call	apic_wr
	lea	rsi, [rip + s_id]
	mov	ecx, 0x20
	call	apic_rd
	cmp	byte ptr [X2], 0
	jne	1f
	shr	eax, 24
1:	test	eax, eax
	jnz	fail_line
	mov	ecx, 0x30
	call	apic_rd
	cmp	al, 0x14
	jne	fail_line
	call	ok_line

	/* Periodic: divide by 16, count 5000: 80,000 crystal ticks a period. */
	call	reset_counts
	mov	ecx, 0x3e0
	mov	eax, 3
	call	apic_wr
	mov	ecx, 0x320
	mov	eax, (1 << 17) | TIMER_VEC
	call	apic_wr
	mov	ecx, 0x380
	mov	eax, 5000
	call	apic_wr
	/* 28 periods between the 2nd and the 30th interrupt, each timed: at least half
	 * must be within 5 % of the period (a wrong rate puts none there). (A delivery the host's scheduler delays by a
	 * tick, 4 ms, coalesces periods into one long interval; that is the host, not the
	 * timer's rate, and KVM does the same.) */
	WAIT	TIMER_VEC, 30
2:	mov	ecx, 0x380
	xor	eax, eax
	call	apic_wr
	mov	rax, 80000
	mul	qword ptr [RATIO_N]
	div	qword ptr [RATIO_D]
	mov	rbx, rax			/* the period in TSC ticks */
	xor	r12d, r12d			/* good periods */
	mov	ecx, 3
3:	mov	rax, [TS + rcx * 8]
	sub	rax, [TS + rcx * 8 - 8]
	sub	rax, rbx
	jae	4f
	neg	rax
4:	imul	rax, rax, 20
	cmp	rax, rbx
	ja	5f
	inc	r12d
5:	inc	ecx
	cmp	ecx, 30
	jbe	3b
	lea	rsi, [rip + s_periodic]
	call	puts
	lea	rsi, [rip + s_good]
	call	puts
	mov	rax, r12
	call	putdec
	lea	rsi, [rip + s_of28]
	call	puts
	mov	rax, rbx
	call	putdec
	cmp	r12d, 14
	jb	6f
	lea	rsi, [rip + s_ok_nl]
	call	puts
	jmp	7f
6:	inc	dword ptr [FAILS]
	lea	rsi, [rip + s_fail_nl]
	call	puts
7:

	/* One-shot: divide by 1, 3,000,000 ticks (long enough that a delivery delayed by
	 * the host's scheduling stays within 5 %); fires once. */
	call	reset_counts
	mov	ecx, 0x3e0
	mov	eax, 0xb
	call	apic_wr
	mov	ecx, 0x320
	mov	eax, TIMER_VEC
	call	apic_wr
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	r12, rax
	mov	ecx, 0x380
	mov	eax, 3000000
	call	apic_wr
	WAIT	TIMER_VEC, 1
2:	/* Nothing more within two more periods (interrupts on). */
	sti
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	add	rax, 2000000
	mov	r13, rax
3:	rdtsc
	shl	rdx, 32
	or	rax, rdx
	cmp	rax, r13
	jb	3b
	cli
	lea	rsi, [rip + s_oneshot]
	cmp	dword ptr [COUNT + TIMER_VEC * 4], 1
	jne	fail_line
	mov	ecx, 0x390
	call	apic_rd
	test	eax, eax
	jnz	fail_line
	mov	rax, [LAST_TSC + TIMER_VEC * 8]
	sub	rax, r12
	mov	rbx, 3000000
	call	check_rate

	/* TSC deadline, 3,000,000 TSC ticks ahead. */
	call	reset_counts
	mov	ecx, 0x320
	mov	eax, (2 << 17) | DL_VEC
	call	apic_wr
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	r12, rax
	add	rax, 3000000
	mov	rdx, rax
	shr	rdx, 32
	mov	ecx, 0x6e0
	wrmsr
	WAIT	DL_VEC, 1
2:	lea	rsi, [rip + s_deadline]
	mov	ecx, 0x6e0
	rdmsr
	or	eax, edx
	jnz	fail_line
	mov	rax, [LAST_TSC + DL_VEC * 8]
	sub	rax, r12
	/* TSC ticks: no crystal ratio (check_tsc, not check_rate). */
	mov	rbx, 3000000
	call	check_tsc
	mov	ecx, 0x320
	mov	eax, 1 << 16
	call	apic_wr

	/* Self-IPIs with EOIs by hand: nesting by class, EOI ends the highest. */
	call	reset_counts
	mov	byte ptr [NOEOI], 1
	lea	rsi, [rip + s_eoi]
	mov	eax, 0x50
	call	self_ipi
	sti
	nop
	cli
	mov	eax, 0x70
	call	self_ipi
	mov	eax, 0x60
	call	self_ipi
	sti
	nop
	cli
	/* Taken: 0x50, then 0x70 (higher class, nested); 0x60 waits below 0x70. */
	cmp	dword ptr [LOGN], 2
	jne	fail_line
	cmp	word ptr [LOG], 0x7050
	jne	fail_line
	mov	ecx, 0x120		/* ISR 0x40-0x5f */
	call	apic_rd
	cmp	eax, 1 << 16
	jne	fail_line
	mov	ecx, 0x130		/* ISR 0x60-0x7f */
	call	apic_rd
	cmp	eax, 1 << 16
	jne	fail_line
	mov	ecx, 0x230		/* IRR 0x60-0x7f: 0x60 */
	call	apic_rd
	cmp	eax, 1
	jne	fail_line
	call	eoi			/* ends 0x70: 0x60 comes in */
	sti
	nop
	cli
	cmp	dword ptr [LOGN], 3
	jne	fail_line
	cmp	byte ptr [LOG + 2], 0x60
	jne	fail_line
	mov	ecx, 0x130
	call	apic_rd
	cmp	eax, 1
	jne	fail_line
	call	eoi			/* ends 0x60 */
	mov	ecx, 0x130
	call	apic_rd
	test	eax, eax
	jnz	fail_line
	mov	ecx, 0x120
	call	apic_rd
	cmp	eax, 1 << 16
	jne	fail_line
	call	eoi			/* ends 0x50 */
	mov	ecx, 0x120
	call	apic_rd
	test	eax, eax
	jnz	fail_line
	mov	byte ptr [NOEOI], 0
	call	ok_line

	/* TPR 0x80 holds back 0x60; CR8 = 5 lets it in. */
	call	reset_counts
	lea	rsi, [rip + s_tpr]
	mov	ecx, 0x80
	mov	eax, 0x80
	call	apic_wr
	mov	eax, 0x60
	call	self_ipi
	sti
	nop
	nop
	cli
	cmp	dword ptr [COUNT + 0x60 * 4], 0
	jne	fail_line
	mov	ecx, 0xa0		/* PPR */
	call	apic_rd
	cmp	eax, 0x80
	jne	fail_line
	mov	rax, cr8
	cmp	rax, 8
	jne	fail_line
	mov	eax, 5
	mov	cr8, rax
	sti
	nop
	cli
	cmp	dword ptr [COUNT + 0x60 * 4], 1
	jne	fail_line
	mov	ecx, 0x80
	call	apic_rd
	cmp	eax, 0x50
	jne	fail_line
	xor	eax, eax
	mov	cr8, rax
	call	ok_line

	/* NMIs: a self-NMI, whose handler sends another; that one must wait for the
	 * handler's IRET (NMI blocking, NMI-window exit) instead of nesting. */
	lea	rsi, [rip + s_nmi]
	mov	dword ptr [NMI_COUNT], 0
	mov	dword ptr [NMI_NESTED], 0
	mov	dword ptr [NMI_DEPTH], 0
	mov	ecx, 0x300
	mov	eax, 0x44400
	call	apic_wr
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	r13, rax
	add	r13, 100000000
1:	cmp	dword ptr [NMI_COUNT], 2
	jae	2f
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	cmp	rax, r13
	jb	1b
	jmp	fail_line
2:	cmp	dword ptr [NMI_NESTED], 0
	jne	fail_line
	call	ok_line
	ret

/* NMI: counts, notes nesting; the first sends a second self-NMI. */
nmi_handler:
	push	rax
	push	rcx
	push	rdx
	cmp	dword ptr [NMI_DEPTH], 0
	je	1f
	inc	dword ptr [NMI_NESTED]
1:	inc	dword ptr [NMI_DEPTH]
	inc	dword ptr [NMI_COUNT]
	cmp	dword ptr [NMI_COUNT], 1
	jne	2f
	mov	ecx, 0x300
	mov	eax, 0x44400
	call	apic_wr
	mov	ecx, 200
3:	pause
	loop	3b
2:	dec	dword ptr [NMI_DEPTH]
	pop	rdx
	pop	rcx
	pop	rax
	iretq

/* vCPU 0, xAPIC mode: IPIs to vCPU 1 and back. */
ipi_checks:
	lea	rsi, [rip + s_ipi_phys]
1:	cmp	dword ptr [READY], 1
	jne	1b
	call	reset_counts
	mov	ecx, 0x310
	mov	eax, 1 << 24
	call	apic_wr
	mov	ecx, 0x300
	mov	eax, 0x4000 | IPI_TO_AP
	call	apic_wr
	WAIT	IPI_TO_BSP, 1
3:	call	ok_line
	/* Logical, flat model: vCPU 1 set LDR bit 1. */
	lea	rsi, [rip + s_ipi_logical]
4:	cmp	dword ptr [READY], 2
	jne	4b
	mov	ecx, 0x310
	mov	eax, 0x02 << 24
	call	apic_wr
	mov	ecx, 0x300
	mov	eax, 0x4800 | IPI_TO_AP
	call	apic_wr
	WAIT	IPI_TO_BSP, 2
6:	call	ok_line
	ret

/* vCPU 1: answers two IPIs with an IPI to APIC 0, then halts with interrupts off. */
ap:
	mov	ecx, 0xf0
	mov	eax, 0x1ff
	call	apic_wr
	mov	ecx, 0xd0
	mov	eax, 0x02 << 24
	call	apic_wr
	mov	dword ptr [READY], 1
	WAIT	IPI_TO_AP, 1
2:	call	ap_reply
	mov	dword ptr [READY], 2
	WAIT	IPI_TO_AP, 2
	call	ap_reply
	cli
	hlt

ap_reply:
	mov	ecx, 0x310
	xor	eax, eax
	call	apic_wr
	mov	ecx, 0x300
	mov	eax, 0x4000 | IPI_TO_BSP
	call	apic_wr
	ret

/* check_rate: rax = measured TSC ticks, rbx = expected crystal ticks; within 5 %. */
check_rate:
	push	rax
	mov	rax, rbx
	mul	qword ptr [RATIO_N]
	div	qword ptr [RATIO_D]
	mov	rbx, rax
	pop	rax
check_tsc:
	push	rsi
	call	puts
	push	rax
	lea	rsi, [rip + s_measured]
	call	puts
	call	putdec
	lea	rsi, [rip + s_expected]
	call	puts
	mov	rax, rbx
	call	putdec
	pop	rax
	pop	rsi
	/* |measured - expected| * 20 <= expected */
	sub	rax, rbx
	jae	1f
	neg	rax
1:	imul	rax, rax, 20
	cmp	rax, rbx
	ja	2f
	lea	rsi, [rip + s_ok_nl]
	jmp	puts
2:	inc	dword ptr [FAILS]
	lea	rsi, [rip + s_fail_nl]
	jmp	puts

ok_line:
	call	puts
	lea	rsi, [rip + s_ok_nl]
	jmp	puts

/* A failed check: report, count, and go on where the caller's caller would. */
fail_line:
	cli
	call	puts
	lea	rsi, [rip + s_fail_nl]
	call	puts
	inc	dword ptr [FAILS]
	mov	byte ptr [NOEOI], 0
	lea	rsi, [rip + s_failed]
	call	puts
	mov	al, 0x01
	out	0xf4, al
	hlt

reset_counts:
	push	rdi
	push	rcx
	push	rax
	mov	rdi, COUNT
	mov	ecx, (0x1000 + 32 * 8 - 0x100) / 8
	xor	eax, eax
	rep	stosq
	mov	dword ptr [LOGN], 0
	pop	rax
	pop	rcx
	pop	rdi
	ret

/* apic_wr(ecx = register offset, eax = value); apic_rd(ecx) -> eax. */
apic_wr:
	push	rdx
	push	rcx
	cmp	byte ptr [X2], 0
	jne	1f
	mov	rdx, APIC
	mov	[rdx + rcx], eax
	pop	rcx
	pop	rdx
	ret
1:	shr	ecx, 4
	add	ecx, 0x800
	xor	edx, edx
	wrmsr
	pop	rcx
	pop	rdx
	ret
apic_rd:
	push	rdx
	push	rcx
	cmp	byte ptr [X2], 0
	jne	1f
	mov	rdx, APIC
	mov	eax, [rdx + rcx]
	pop	rcx
	pop	rdx
	ret
1:	shr	ecx, 4
	add	ecx, 0x800
	rdmsr
	pop	rcx
	pop	rdx
	ret

/* self_ipi(eax = vector): the ICR's self shorthand, or x2APIC's SELF_IPI register. */
self_ipi:
	push	rcx
	cmp	byte ptr [X2], 0
	jne	1f
	or	eax, 0x44000
	mov	ecx, 0x300
	call	apic_wr
	pop	rcx
	ret
1:	push	rdx
	mov	ecx, 0x83f
	xor	edx, edx
	wrmsr
	pop	rdx
	pop	rcx
	ret

eoi:
	push	rax
	push	rcx
	mov	ecx, 0xb0
	xor	eax, eax
	call	apic_wr
	pop	rcx
	pop	rax
	ret

/* IDT: every vector to its stub; #GP to gp_handler. */
setup_idt:
	cmp	r15, 0
	jne	2f
	mov	rdi, IDT
	lea	rax, [rip + stubs]
	xor	ecx, ecx
1:	mov	rdx, rax
	mov	word ptr [rdi], dx
	mov	word ptr [rdi + 2], 0x8
	mov	word ptr [rdi + 4], 0x8e00
	shr	rdx, 16
	mov	word ptr [rdi + 6], dx
	shr	rdx, 16
	mov	dword ptr [rdi + 8], edx
	mov	dword ptr [rdi + 12], 0
	add	rdi, 16
	add	rax, 16
	inc	ecx
	cmp	ecx, 256
	jne	1b
	lea	rax, [rip + nmi_handler]
	mov	rdi, IDT + 2 * 16
	mov	word ptr [rdi], ax
	shr	rax, 16
	mov	word ptr [rdi + 6], ax
	shr	rax, 16
	mov	dword ptr [rdi + 8], eax
	lea	rax, [rip + gp_handler]
	mov	rdi, IDT + 13 * 16
	mov	word ptr [rdi], ax
	shr	rax, 16
	mov	word ptr [rdi + 6], ax
	shr	rax, 16
	mov	dword ptr [rdi + 8], eax
2:	lea	rax, [rip + idtr]
	lidt	[rax]
	ret

gp_handler:
	mov	byte ptr [GPF], 1
	add	rsp, 8			/* error code */
	add	qword ptr [rsp], 2	/* past RDMSR/WRMSR */
	iretq

/* One 16-byte stub per vector: push it, go to the common handler. */
	.balign	16
stubs:
	.set	v, 0
	.rept	256
	.balign	16
	push	rax
	mov	eax, v
	jmp	common
	.set	v, v + 1
	.endr

common:
	push	rbx
	push	rcx
	push	rdx
	mov	ebx, eax
	mov	ecx, [LOGN]
	cmp	ecx, 0x40
	jae	1f
	mov	[LOG + rcx], bl
	inc	dword ptr [LOGN]
1:	inc	dword ptr [COUNT + rbx * 4]
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	[LAST_TSC + rbx * 8], rax
	cmp	ebx, TIMER_VEC
	jne	2f
	mov	ecx, [COUNT + rbx * 4]
	cmp	ecx, 31
	ja	2f
	mov	[TS + rcx * 8], rax
2:	cmp	ebx, 0xff		/* spurious: no EOI */
	je	3f
	cmp	byte ptr [NOEOI], 0
	jne	3f
	call	eoi
3:	pop	rdx
	pop	rcx
	pop	rbx
	pop	rax
	iretq

/* putdec(rax) */
putdec:
	push	rax
	push	rbx
	push	rcx
	push	rdx
	mov	rbx, 10
	xor	ecx, ecx
1:	xor	edx, edx
	div	rbx
	push	rdx
	inc	ecx
	test	rax, rax
	jnz	1b
2:	pop	rax
	add	al, '0'
	call	putc
	loop	2b
	pop	rdx
	pop	rcx
	pop	rbx
	pop	rax
	ret

putc:
	push	rdx
	mov	dx, 0x3f8
	out	dx, al
	pop	rdx
	ret

/* puts(rsi): up to NUL; keeps rsi. */
puts:
	push	rsi
	push	rax
1:	lodsb
	test	al, al
	jz	2f
	call	putc
	jmp	1b
2:	pop	rax
	pop	rsi
	ret

	.data
	.balign	8
idtr:	.word	256 * 16 - 1
	.quad	IDT
s_cpuid:	.asciz	"cpuid: apic x2apic tsc-deadline, leaf 0x15"
s_xapic:	.asciz	"mode: xapic\n"
s_x2apic:	.asciz	"mode: x2apic\n"
s_id:		.asciz	"id and version"
s_periodic:	.asciz	"periodic timer"
s_oneshot:	.asciz	"one-shot timer"
s_deadline:	.asciz	"tsc-deadline timer"
s_eoi:		.asciz	"self-ipi nesting and eoi order"
s_tpr:		.asciz	"tpr and cr8 mask lower classes"
s_nmi:		.asciz	"self-nmi, a second one waits for iret"
s_ipi_phys:	.asciz	"ipi to vcpu 1 and back (physical)"
s_ipi_logical:	.asciz	"ipi to vcpu 1 and back (logical flat)"
s_msi:		.asciz	"msi from the host"
s_gp:		.asciz	"x2apic absent register is #gp"
s_good:		.asciz	": "
s_of28:		.asciz	" of 28 periods within 5 % of "
s_measured:	.asciz	": measured "
s_expected:	.asciz	" expected "
s_ok_nl:	.asciz	" ok\n"
s_fail_nl:	.asciz	" FAIL\n"
s_allok:	.asciz	"apic64: all ok\n"
s_failed:	.asciz	"apic64: FAILED\n"
