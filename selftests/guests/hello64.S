/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A 64-bit guest: prints a line on COM1, touches fresh stack and data pages (shadow
 * page faults), reads CPUID, and exits through isa-debug-exit with 0x2a.
 * rvmm-run enters it in long mode with the first 4 GiB identity-mapped.
 */
	.code64
	.text
	.globl _start
_start:
	/* A command line (rvmm-run --append) comes in RDI: echo it first. */
	test	%rdi, %rdi
	jz	0f
	mov	%rdi, %rsi
	call	puts
	lea	nl(%rip), %rsi
	call	puts
0:	lea	msg(%rip), %rsi
	call	puts
	/* Write and read back one word in each of 16 pages above 8 MiB. */
	mov	$0x800000, %rdi
	mov	$16, %ecx
1:	mov	%rdi, (%rdi)
	cmp	%rdi, (%rdi)
	jne	fail
	add	$0x1000, %rdi
	loop	1b
	/* CPUID works and the stack works (call/ret above). */
	xor	%eax, %eax
	cpuid
	test	%eax, %eax
	jz	fail
	/* CPUID's values differ between CPUs: leave none in the final state, which the
	 * differential tests compare across rvmm, KVM in Bochs and KVM on the host. */
	xor	%eax, %eax
	xor	%ebx, %ebx
	xor	%ecx, %ecx
	xor	%edx, %edx
	lea	ok(%rip), %rsi
	call	puts
	mov	$0x2a, %al
	out	%al, $0xf4
	hlt

fail:
	lea	bad(%rip), %rsi
	call	puts
	mov	$0x01, %al
	out	%al, $0xf4
	hlt

/* puts(rsi): bytes up to NUL to COM1. */
puts:
	mov	$0x3f8, %dx
2:	lodsb
	test	%al, %al
	jz	3f
	out	%al, %dx
	jmp	2b
3:	ret

nl:	.asciz "\n"
msg:	.asciz "hello from a 64-bit guest\n"
ok:	.asciz "memory and cpuid ok\n"
bad:	.asciz "FAILED\n"
