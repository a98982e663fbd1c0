/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: guest-measured TSC ticks per CPUID exit round trip (in Bochs, ticks count
 * emulated instructions, guest and host together). Prints "cpuid ticks/op: N".
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set N, 10000
_start:
	/* Warm up: fault in the code and stack pages. */
	xor	eax, eax
	cpuid
	call	tsc_start
	mov	r13d, N
1:	xor	eax, eax
	cpuid
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
msg:	.asciz	"cpuid"
