/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A consistent virtual CPU (a flat binary at 0x100000 in long mode): what CPUID hides
 * the guest cannot turn on, and the exceptions that belong to the guest reach its own
 * handlers with the right vector, error code and RFLAGS.RF (set for faults, SDM 6.13).
 *   - CPUID.1 hides VMX, MONITOR, MTRR and shows MCE, MCA and "hypervisor";
 *     CPUID.7 hides UMIP and PKU.
 *   - CR4 bits of hidden features (VMXE, UMIP, PKE) and LA57: #GP(0); CR4.MCE sets.
 *   - VMXON, MONITOR: #UD; RDTSCP: #UD exactly when CPUID.80000001H:EDX hides it;
 *     IA32_MCG_CAP reads (banks, MCG_CTL_P); the MSR after the last bank and a
 *     non-zero MC0_STATUS write: #GP(0); WRMSR of an unknown MSR: #GP(0).
 * Each check prints a line; the guest ends with a word-sized OUT to the exit port:
 * 0x2d if all passed, 1 if not.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set IDT, 0x300000
_start:
	/* #UD (6) and #GP (13) handlers. */
	lea	rax, [rip + ud_handler]
	mov	rdi, IDT + 6 * 16
	call	set_gate
	lea	rax, [rip + gp_handler]
	mov	rdi, IDT + 13 * 16
	call	set_gate
	lea	rax, [rip + idtr]
	lidt	[rax]

	lea	rsi, [rip + s_cpuid1]
	mov	eax, 1
	cpuid
	test	ecx, (1 << 5) | (1 << 3)
	jnz	fail
	test	edx, 1 << 12
	jnz	fail
	and	edx, (1 << 7) | (1 << 14)
	cmp	edx, (1 << 7) | (1 << 14)
	jne	fail
	bt	ecx, 31
	jnc	fail
	call	ok
	lea	rsi, [rip + s_cpuid7]
	mov	eax, 7
	xor	ecx, ecx
	cpuid
	test	ecx, (1 << 2) | (1 << 3)
	jnz	fail
	call	ok

	/* CR4 bits: each write must #GP(0) with RF set in the pushed RFLAGS. */
	.irp	bit, 13, 11, 22, 12
	lea	rsi, [rip + s_cr4_\bit]
	mov	rax, cr4
	bts	rax, \bit
	mov	r12, 3			/* mov cr4, rax: 0f 22 e0 */
	mov	byte ptr [rip + got], 0xff
	mov	cr4, rax
	call	want_gp0
	.endr

	lea	rsi, [rip + s_cr4mce]
	mov	rax, cr4
	bts	rax, 6
	mov	r12, 3
	mov	byte ptr [rip + got], 0xff
	mov	cr4, rax
	call	want_none
	btr	rax, 6
	mov	cr4, rax

	lea	rsi, [rip + s_vmxon]
	mov	r12, 5			/* vmxon [rsp]: f3 0f c7 34 24 */
	mov	byte ptr [rip + got], 0xff
	vmxon	[rsp]
	call	want_ud
	lea	rsi, [rip + s_monitor]
	mov	r12, 3
	mov	byte ptr [rip + got], 0xff
	xor	ecx, ecx
	xor	edx, edx
	lea	rax, [rip + got]
	monitor
	call	want_ud
	lea	rsi, [rip + s_rdtscp]
	mov	eax, 0x80000001
	cpuid
	mov	r13d, edx
	mov	r12, 3
	mov	byte ptr [rip + got], 0xff
	rdtscp
	bt	r13d, 27
	jc	1f
	call	want_ud
	jmp	2f
1:	call	want_none
2:
	lea	rsi, [rip + s_mcg]
	mov	r12, 2
	mov	byte ptr [rip + got], 0xff
	mov	ecx, 0x179
	rdmsr
	movzx	r13d, al		/* the bank count */
	cmp	byte ptr [rip + got], 0xff
	jne	1f
	bt	eax, 8			/* MCG_CTL_P */
	jnc	1f
	test	r13d, r13d
	jz	1f
	call	ok
	jmp	2f
1:	call	fail
2:	lea	rsi, [rip + s_mcbank]
	lea	ecx, [r13 * 4 + 0x400]
	mov	r12, 2
	mov	byte ptr [rip + got], 0xff
	rdmsr
	call	want_gp0
	lea	rsi, [rip + s_mcstatus]
	mov	ecx, 0x401
	mov	eax, 1
	xor	edx, edx
	mov	r12, 2
	mov	byte ptr [rip + got], 0xff
	wrmsr
	call	want_gp0
	lea	rsi, [rip + s_wrmsr]
	mov	r12, 2
	mov	byte ptr [rip + got], 0xff
	mov	ecx, 0x1234
	xor	eax, eax
	xor	edx, edx
	wrmsr
	call	want_gp0

	cmp	dword ptr [rip + fails], 0
	jne	1f
	lea	rsi, [rip + s_allok]
	call	puts
	mov	dx, 0xf4
	mov	ax, 0x2d
	out	dx, ax
	hlt
1:	mov	dx, 0xf4
	mov	ax, 1
	out	dx, ax
	hlt

want_gp0:
	cmp	byte ptr [rip + got], 13
	jne	fail
	cmp	qword ptr [rip + got_ec], 0
	jne	fail
	jmp	want_rf
want_none:
	cmp	byte ptr [rip + got], 0xff
	jne	fail
	jmp	ok
want_ud:
	cmp	byte ptr [rip + got], 6
	jne	fail
want_rf:
	bt	qword ptr [rip + got_rflags], 16
	jnc	fail
ok:
	call	puts
	push	rsi
	lea	rsi, [rip + s_ok]
	call	puts
	pop	rsi
	ret
fail:
	call	puts
	push	rsi
	lea	rsi, [rip + s_fail]
	call	puts
	pop	rsi
	inc	dword ptr [rip + fails]
	ret

/* The handlers note the vector, error code and saved RFLAGS, and skip r12 bytes. */
gp_handler:
	mov	byte ptr [rip + got], 13
	pop	qword ptr [rip + got_ec]
	jmp	1f
ud_handler:
	mov	byte ptr [rip + got], 6
	mov	qword ptr [rip + got_ec], -1
1:	push	rax
	mov	rax, [rsp + 24]		/* RFLAGS: rax, RIP, CS, RFLAGS */
	mov	[rip + got_rflags], rax
	add	[rsp + 8], r12
	pop	rax
	iretq

set_gate:
	mov	word ptr [rdi], ax
	mov	word ptr [rdi + 2], 0x8
	mov	word ptr [rdi + 4], 0x8e00
	shr	rax, 16
	mov	word ptr [rdi + 6], ax
	shr	rax, 16
	mov	dword ptr [rdi + 8], eax
	mov	dword ptr [rdi + 12], 0
	ret

puts:
	push	rsi
	push	rax
	push	rdx
	mov	dx, 0x3f8
1:	lodsb
	test	al, al
	jz	2f
	out	dx, al
	jmp	1b
2:	pop	rdx
	pop	rax
	pop	rsi
	ret

	.data
	.balign	8
idtr:	.word	256 * 16 - 1
	.quad	IDT
got_ec:	.quad	0
got_rflags: .quad 0
fails:	.long	0
got:	.byte	0
s_cpuid1: .asciz "cpuid.1 hides vmx monitor mtrr, shows mce mca hypervisor"
s_cpuid7: .asciz "cpuid.7 hides umip pku"
s_cr4_13: .asciz "cr4.vmxe: #gp(0), rf"
s_cr4_11: .asciz "cr4.umip: #gp(0), rf"
s_cr4mce: .asciz "cr4.mce: sets"
s_cr4_22: .asciz "cr4.pke: #gp(0), rf"
s_cr4_12: .asciz "cr4.la57: #gp(0), rf"
s_vmxon: .asciz	"vmxon: #ud, rf"
s_monitor: .asciz "monitor: #ud, rf"
s_rdtscp: .asciz "rdtscp: #ud (rf) exactly when cpuid hides it"
s_mcg:	.asciz	"rdmsr mcg_cap: banks, mcg_ctl_p"
s_mcbank: .asciz "rdmsr after the last bank: #gp(0), rf"
s_mcstatus: .asciz "wrmsr mc0_status = 1: #gp(0), rf"
s_wrmsr: .asciz	"wrmsr 0x1234: #gp(0), rf"
s_ok:	.asciz	" ok\n"
s_fail:	.asciz	" FAIL\n"
s_allok: .asciz	"consist64: all ok\n"
