/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: guest-measured TSC ticks per first touch of a fresh 4-KiB page (a shadow
 * page fault under rvmm and KVM ept=0; an EPT violation under ept=1) (in Bochs, ticks count
 * emulated instructions, guest and host together). Prints "touch ticks/op: N".
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set N, 2048
_start:
	/* Warm up: fault in the code and stack pages. */
	xor	eax, eax
	cpuid
	call	tsc_start
	mov	r13d, N
	mov	rdi, 0x400000
1:	mov	byte ptr [rdi], 1
	add	rdi, 0x1000
	dec	r13d
	jnz	1b
	mov	rcx, N
	call	tsc_per_op
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r12
	call	print_ticks
	jmp	done

	.include "lib.inc"

	.data
msg:	.asciz	"touch"
